"""`iso-proxy echo` as operators run it: against the proxy, a switch, and a silent switch."""

from __future__ import annotations

import re
import subprocess
import sys

import trio

from tests.conftest import proxy_config, start_proxy, start_switch, unused_port

LINE = re.compile(r"^0810 from 127\.0\.0\.1:\d+: stan=\d{6} rc=00 time=\d+\.\d\d ms$")


async def _echo(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "proxy", "echo", f"127.0.0.1:{port}", "-i", "0.05", *args]
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


async def test_echo_against_the_proxy_and_against_a_switch(nursery: trio.Nursery) -> None:
    switch = await start_switch(nursery)
    _, proxy_port = await start_proxy(nursery, proxy_config({"alpha": switch.port}))
    for port in (proxy_port, switch.port):
        result = await _echo(port, "-n", "3")
        lines = result.stdout.decode().splitlines()
        assert result.returncode == 0, result.stdout + result.stderr
        assert lines[0] == f"ECHO 127.0.0.1:{port} (binary2, 3 echoes, 0.05 s apart)"
        assert all(LINE.match(line) for line in lines[1:4]), lines
        assert lines[4] == f"--- 127.0.0.1:{port} echo statistics ---"
        assert lines[5] == "3 sent, 3 answered, 3 approved, 0% loss"
        assert re.fullmatch(r"rtt min/avg/max/p99 = [\d.]+/[\d.]+/[\d.]+/[\d.]+ ms", lines[6])


async def test_echo_against_a_switch_that_drops_echoes_reports_the_loss(
    nursery: trio.Nursery,
) -> None:
    switch = await start_switch(nursery, mute=True)
    result = await _echo(switch.port, "-n", "2", "--timeout", "0.2")
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 1
    assert lines[1].startswith("no answer for stan=") and lines[1].endswith("within 0.2 s")
    assert "2 sent, 0 answered, 0 approved, 100% loss" in lines
    assert switch.received["0800"] == 2


async def test_echo_when_nothing_listens_fails_clearly() -> None:
    port = await unused_port()
    result = await _echo(port, "-n", "1")
    output = result.stdout.decode()
    assert result.returncode == 1
    assert f"connection to 127.0.0.1:{port} failed" in output
    assert "0 sent, 0 answered, 0 approved, 0% loss" in output


async def test_echo_refuses_a_bad_target() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "proxy", "echo", "localhost"], capture_stderr=True, check=False
    )
    assert result.returncode == 2
    assert b"expected HOST:PORT" in result.stderr


async def test_echo_reports_what_it_sent_when_the_connection_drops(
    nursery: trio.Nursery,
) -> None:
    switch = await start_switch(nursery, close_after=3)  # answers two, then hangs up
    result = await _echo(switch.port, "-n", "5", "--timeout", "1")
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 1
    assert sum(1 for line in lines if LINE.match(line)) == 2
    assert any(line.startswith(f"connection to 127.0.0.1:{switch.port} failed") for line in lines)
    assert "3 sent, 2 answered, 2 approved, 33% loss" in lines


async def test_echo_refuses_bad_durations() -> None:
    for option in ("--timeout", "-i"):
        for value in ("-1", "0", "nan", "soon"):
            result = await trio.run_process(
                [sys.executable, "-m", "proxy", "echo", "127.0.0.1:1", option, value],
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 2, (option, value)
            assert b"expected seconds" in result.stderr
