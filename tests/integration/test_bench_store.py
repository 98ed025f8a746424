"""The store benchmark runs and reports (its numbers are judged by the script, not here)."""

from __future__ import annotations

import re
import sys

import trio

from tests.conftest import journal_dsn


async def test_store_benchmark_reports_both_paths() -> None:
    dsn = journal_dsn()
    result = await trio.run_process(
        [sys.executable, "-m", "bench.store", "--dsn", dsn, "--rows", "300", "--concurrency", "16"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode in (0, 1), result.stderr  # 1 only means "below the 5x target"
    assert re.search(r"^batched\s+300\s+[\d.]+\s+\d+$", out, re.M), out
    assert re.search(r"^single\s+300\s+[\d.]+\s+\d+$", out, re.M), out
    assert re.search(r"^batched / single = [\d.]+x \(target >= 5x\), 16 claimers$", out, re.M)
