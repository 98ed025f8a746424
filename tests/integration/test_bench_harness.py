"""The benchmark harness runs end to end and reports what it measured (its numbers are
for BENCHMARKS.md, not judged here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from bench.processes import parent_pid, pids_where
from tests.conftest import journal_dsn


async def test_a_small_benchmark_writes_its_table_and_json(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench", "--dsn", journal_dsn(), "--out", str(tmp_path)]
    argv += ["--rates", "200", "--duration", "1", "--repeats", "1", "--idle", "200"]
    with trio.fail_after(50):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    table = result.stdout.decode()
    assert "case target" in table and "200 idle connections" in table
    assert "times the bare trio forwarder's in this run" in table
    report = json.loads((tmp_path / "results.json").read_text())
    cases = {(row["case"], row["target"]) for row in report["medians"]}
    assert cases == {
        ("200", "direct"),
        ("200", "proxy"),
        ("closed", "direct"),
        ("closed", "bare"),
        ("closed", "proxy"),
    }
    through_proxy = [run for run in report["runs"] if run["target"] == "proxy"]
    for run in through_proxy:
        assert run["answered"] == run["approved"] == run["journal_rows"] > 0
        assert run["proxy_cpu_us_per_txn"] > 0
    (bare,) = [run for run in report["runs"] if run["target"] == "bare"]
    assert bare["answered"] == bare["approved"] > 0 and bare["journal_rows"] == 0
    assert bare["forwarder_cpu_us_per_txn"] > 0
    (closed,) = [
        row for row in report["medians"] if row["target"] == "proxy" and row["case"] == "closed"
    ]
    assert closed["cpu_times_bare"] == round(
        closed["proxy_cpu_us_per_txn"] / bare["forwarder_cpu_us_per_txn"], 2
    )
    for run in report["runs"]:  # where the rest of the box's CPU went, in every case
        assert run["switches_cpu_us_per_txn"] > 0 and run["load_cpu_us_per_txn"] > 0
    assert report["idle"]["idle_connections"] == 200
    assert report["idle"]["active"]["answered"] > 0


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid`."""
    return set(pids_where(lambda entry: parent_pid(entry) == pid))


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


async def test_sigterm_stops_every_child_of_the_benchmark() -> None:
    argv = [sys.executable, "-m", "bench", "--dsn", journal_dsn(), "--out", "/nonexistent"]
    argv += ["--rates", "100", "--duration", "30", "--repeats", "1", "--idle", "0"]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    assert process.stderr is not None
    output = b""
    children: set[int] = set()
    try:
        with trio.fail_after(30):
            while b"repeat 1/1" not in output:  # switches and proxy are up
                chunk = await process.stderr.receive_some(4096)
                assert chunk, output.decode()
                output += chunk
        children = _children(process.pid)
        assert len(children) >= 4  # two switches, the forwarder and the proxy (and a load
        # generator, soon)
        process.terminate()
        with trio.fail_after(30):
            while chunk := await process.stderr.receive_some(4096):
                output += chunk
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        for pid in _alive(children):  # a failed test must not leave them running
            os.kill(pid, signal.SIGKILL)
        await process.stderr.aclose()
    assert b"stopped by a signal" in output
    assert _alive(children) == set()
