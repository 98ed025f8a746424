"""The benchmark harness runs end to end and reports what it measured (its numbers are
for BENCHMARKS.md, not judged here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from tests.conftest import journal_dsn


async def test_a_small_benchmark_writes_its_table_and_json(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench", "--dsn", journal_dsn(), "--out", str(tmp_path)]
    argv += ["--rates", "200", "--duration", "1", "--repeats", "1", "--idle", "200"]
    with trio.fail_after(50):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    table = result.stdout.decode()
    assert "case target" in table and "200 idle connections" in table
    report = json.loads((tmp_path / "results.json").read_text())
    cases = {(row["case"], row["target"]) for row in report["medians"]}
    assert cases == {("200", "direct"), ("200", "proxy"), ("closed", "direct"), ("closed", "proxy")}
    through_proxy = [run for run in report["runs"] if run["target"] == "proxy"]
    for run in through_proxy:
        assert run["answered"] == run["approved"] == run["journal_rows"] > 0
        assert run["proxy_cpu_us_per_txn"] > 0
    assert report["idle"]["active"]["answered"] > 0
