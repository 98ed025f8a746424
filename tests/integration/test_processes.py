"""The README quick start, as real processes: two `sim-switch`es and `iso-proxy run`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fixtures.messages import echo, financial
from tests.conftest import TEST_PAN_KEY, Database, Terminals, start_switch

LISTENING = re.compile(rb"(?:iso_proxy\.server: |sim switch )listening on [^ ]+:(\d+)")
ADMIN = re.compile(rb"admin listening on [^ ]+:(\d+)")
LINK_UP = re.compile(rb"link [^ ]+: up$")


class _Process:
    """A child process whose stderr is kept line by line, for waiting and for assertions."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = bytearray()
        self.lines: list[bytes] = []
        self._new_line = trio.Event()
        self._ended = False

    async def pump(self) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        async with stderr:  # closed at the child's end, or when the test's nursery ends
            pending = b""
            while chunk := await stderr.receive_some(4096):
                self.output += chunk
                *lines, pending = (pending + chunk).split(b"\n")
                self.lines.extend(lines)
                self._new_line.set()
                self._new_line = trio.Event()
        self._ended = True
        self._new_line.set()

    async def wait_for(self, pattern: re.Pattern[bytes], count: int = 1) -> list[re.Match[bytes]]:
        """The first `count` matches of `pattern` among the lines so far and to come."""
        while True:
            matches = [m for line in self.lines if (m := pattern.search(line))]
            if len(matches) >= count:
                return matches[:count]
            if self._ended:
                raise AssertionError(
                    f"no {pattern.pattern!r}: {self.output.decode(errors='replace')}"
                )
            await self._new_line.wait()

    async def port(self) -> int:
        return int((await self.wait_for(LISTENING))[0].group(1))


class _Children:
    """Spawns `python -m proxy ...` children for one test; kills what is left at the end."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.spawned: list[_Process] = []

    async def spawn(self, *args: str, env: dict[str, str] | None = None) -> _Process:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxy", *args],
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        child = _Process(process)
        self.spawned.append(child)
        self._nursery.start_soon(child.pump)
        return child


@pytest.fixture
async def children(nursery: trio.Nursery) -> AsyncIterator[_Children]:
    spawned = _Children(nursery)
    yield spawned
    for child in spawned.spawned:
        if child.process.returncode is None:
            child.process.kill()
            await child.process.wait()


async def _stop(child: _Process) -> None:
    child.process.send_signal(signal.SIGTERM)
    assert await child.process.wait() == 0, child.output.decode(errors="replace")


async def test_quick_start_processes_carry_traffic_and_stop_cleanly(
    tmp_path: Path, terminals: Terminals, children: _Children
) -> None:
    alpha = await children.spawn("sim-switch", "--port", "0")
    beta = await children.spawn("sim-switch", "--port", "0", "--delay", "0.01")
    config = tmp_path / "config.yaml"
    config.write_text(
        "listen: {host: 127.0.0.1, port: 0}\nstore: {enabled: false}\nadmin: {port: 0}\n"
        "switches:\n"
        f"  - {{name: alpha, host: 127.0.0.1, port: {await alpha.port()}, connections: 2}}\n"
        f"  - {{name: beta, host: 127.0.0.1, port: {await beta.port()}, connections: 2}}\n"
    )
    proxy = await children.spawn("run", "-c", str(config))
    with trio.fail_after(20):
        port = await proxy.port()
        await proxy.wait_for(LINK_UP, count=4)  # each link answered its first echoes
        terminal = await terminals.connect(port)
        reply = await terminal.request(echo(1))
        assert (reply.mti.code, reply.get("39")) == ("0810", "00")
        for stan in range(2, 12):
            reply = await terminal.request(financial(stan))
            assert (reply.mti.code, reply.get("39"), reply.get("11")) == (
                "0210",
                "00",
                f"{stan:06d}",
            )
        await terminal.aclose()
        for child in (proxy, alpha, beta):
            await _stop(child)
    assert b"4111111111111111" not in proxy.output


async def test_run_signs_on_and_signs_off_on_sigterm(
    tmp_path: Path, nursery: trio.Nursery, children: _Children
) -> None:
    switch = await start_switch(nursery)
    config = tmp_path / "config.yaml"
    config.write_text(
        "listen: {host: 127.0.0.1, port: 0}\nstore: {enabled: false}\nadmin: {port: 0}\n"
        f"switches: [{{name: alpha, host: 127.0.0.1, port: {switch.port}, connections: 2,"
        " sign_on: true}]\n"
    )
    proxy = await children.spawn("run", "-c", str(config))
    with trio.fail_after(20):
        await proxy.wait_for(LINK_UP, count=2)
        await _stop(proxy)
    assert len(switch.openings) == 2
    for opening in switch.openings:
        assert opening[0] == "0800/001"
        assert opening[-1] == "0800/002"


async def test_a_killed_proxy_has_what_it_left_in_flight_reversed_once(
    tmp_path: Path,
    nursery: trio.Nursery,
    children: _Children,
    database: Database,
    terminals: Terminals,
) -> None:
    switch = await start_switch(nursery, delay=60)  # holds every purchase: all in flight
    config = tmp_path / "config.yaml"
    config.write_text(
        "listen: {host: 127.0.0.1, port: 0}\nadmin: {port: 0}\n"
        f"switches: [{{name: alpha, host: 127.0.0.1, port: {switch.port}, timeout: 1}}]\n"
        f"store: {{schema: {database.schema}, timeout: 0.5}}\n"
        "reversal: {backoff_initial: 0.2, backoff_max: 1}\n"
    )
    env = {"ISO_PROXY_DSN": database.dsn, "ISO_PROXY_PAN_KEY": TEST_PAN_KEY.decode()}
    first = await children.spawn("run", "-c", str(config), env=env)
    with trio.fail_after(20):
        port = await first.port()
        await first.wait_for(LINK_UP)
        terminal = await terminals.connect(port)
        await terminal.stream.send_all(
            b"".join(terminal.frame(financial(stan)) for stan in (71, 72, 73))
        )
        await switch.wait_until(lambda: switch.financial_total() >= 3)
    first.process.kill()  # SIGKILL: no outcome recorded, nothing cleaned up
    await first.process.wait()

    second = await children.spawn("run", "-c", str(config), env=env)
    with trio.fail_after(30):
        await second.wait_for(LINK_UP)
        await switch.wait_until(lambda: switch.received_reversals() >= 3)
    reversed_stans = sorted(r.get("11") or "" for r in switch.requests if r.mti.code == "0400")
    assert reversed_stans == ["000071", "000072", "000073"]  # each once
    purchases = [r.get("11") or "" for r in switch.requests if r.mti.message_class == 2]
    assert sorted(purchases) == ["000071", "000072", "000073"]  # none forwarded again
    rows = await database.fetch("SELECT state FROM transactions")
    assert [r["state"] for r in rows] == ["timed_out"] * 3
    await _stop(second)


async def _refused(port: int) -> bool:
    """Whether connecting to `port` is refused (nothing listens there), trying for 1 s:
    the listener closes in the proxy's next scheduler pass after it logs that."""
    for _ in range(100):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return True
        await stream.aclose()
        await trio.sleep(0.01)  # nothing to wait on but the port itself
    return False


async def test_sigterm_under_load_answers_every_request_taken_then_exits_0(
    tmp_path: Path, nursery: trio.Nursery, children: _Children, terminals: Terminals
) -> None:
    switch = await start_switch(nursery, delay=2.0)  # longer than _refused tries
    config = tmp_path / "config.yaml"
    config.write_text(
        "listen: {host: 127.0.0.1, port: 0, shutdown_grace: 10}\n"
        "store: {enabled: false}\nadmin: {port: 0}\n"
        f"switches: [{{name: alpha, host: 127.0.0.1, port: {switch.port}, connections: 2}}]\n"
    )
    proxy = await children.spawn("run", "-c", str(config))
    with trio.fail_after(20):
        port = await proxy.port()
        await proxy.wait_for(LINK_UP, count=2)
        terminal = await terminals.connect(port)
        await terminal.stream.send_all(
            b"".join(terminal.frame(financial(stan)) for stan in range(1, 21))
        )
        await switch.wait_until(lambda: switch.financial_total() == 20)
        proxy.process.send_signal(signal.SIGTERM)  # all 20 in flight at the switch
        await proxy.wait_for(re.compile(rb"draining: 20 request\(s\) in flight"))
        assert await _refused(port)  # the listener is closed while the 20 are answered:
        assert proxy.process.returncode is None  # not because the proxy is gone already
        answers = [await terminal.receive() for _ in range(20)]
        assert sorted(a.get("11") or "" for a in answers) == [f"{s:06d}" for s in range(1, 21)]
        assert {a.get("39") for a in answers} == {"00"}
        assert await proxy.process.wait() == 0, proxy.output.decode(errors="replace")
    assert b"drained: every request taken was answered" in proxy.output


async def test_sighup_reloads_the_switch_list(
    tmp_path: Path, nursery: trio.Nursery, children: _Children, terminals: Terminals
) -> None:
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery)
    config = tmp_path / "config.yaml"
    head = "listen: {host: 127.0.0.1, port: 0}\nstore: {enabled: false}\nadmin: {port: 0}\n"
    config.write_text(head + f"switches: [{{name: alpha, host: 127.0.0.1, port: {alpha.port}}}]\n")
    proxy = await children.spawn("run", "-c", str(config))
    with trio.fail_after(20):
        port = await proxy.port()
        await proxy.wait_for(LINK_UP)
        config.write_text(
            head + f"switches: [{{name: beta, host: 127.0.0.1, port: {beta.port}}}]\n"
        )
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_for(re.compile(rb"reloaded .*: switches beta"))
        await proxy.wait_for(LINK_UP, count=2)  # beta's link, after alpha's
        terminal = await terminals.connect(port)
        assert (await terminal.request(financial(1))).get("39") == "00"
        await _stop(proxy)
    assert (alpha.financial_total(), beta.financial_total()) == (0, 1)
