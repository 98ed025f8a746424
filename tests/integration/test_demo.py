"""`iso-proxy demo` as a user runs it: traffic shows up, echo works, Ctrl-C leaves nothing
behind, and a second run in the same folder works too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from bench.processes import pids_where
from tests.conftest import unused_port

TABLE_ROW = re.compile(rb"^(alpha|beta)\s+up\s+2/2\s+[\d.]+\s+(\d+)\s", re.M)


def _postgres_for(data_dir: Path) -> list[int]:
    """PostgreSQL servers running on `data_dir` (the embedded one)."""
    return pids_where(lambda entry: str(data_dir).encode() in (entry / "cmdline").read_bytes())


async def _demo_round(data_dir: Path, port: int, admin_port: int) -> None:
    argv = [sys.executable, "-m", "proxy", "demo", "--port", str(port)]
    argv += ["--admin-port", str(admin_port), "--data-dir", str(data_dir)]
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=data_dir.parent
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(40):  # the first run creates the database
            while sum(int(n) for _, n in TABLE_ROW.findall(output[-2000:])) < 3:
                chunk = await process.stdout.receive_some(65536)
                assert chunk, output.decode()[-2000:]
                output += chunk
        echo = await trio.run_process(
            [sys.executable, "-m", "proxy", "echo", f"localhost:{port}", "-n", "2"],
            capture_stdout=True,
            check=False,
        )
        assert echo.returncode == 0, echo.stdout.decode()
        assert b"2 answered, 2 approved" in echo.stdout
        assert b"replay" in output  # the duplicate and the repeat, answered from the journal
        process.send_signal(signal.SIGINT)  # Ctrl-C
        with trio.fail_after(20):
            while await process.stdout.receive_some(65536):
                pass
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        await process.stdout.aclose()
    assert process.returncode == 0
    for taken in (port, admin_port):  # both ports free again
        with trio.socket.socket() as probe:
            await probe.bind(("127.0.0.1", taken))
    assert _postgres_for(data_dir) == []


async def test_the_demo_runs_twice_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-pg"
    for _ in range(2):
        await _demo_round(data_dir, await unused_port(), await unused_port())
    assert os.listdir(data_dir)  # the database stayed for the next run
