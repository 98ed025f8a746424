"""Attacks on the listener (scenarios 21-23): oversized length prefixes, slowloris, idle
connections and a 10 000-connection flood from another process. Real sockets and real
(short) deadlines; each test ends with the proxy serving and its file descriptors back."""

from __future__ import annotations

import gc
import json
import logging
import os
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from bench.processes import rss_bytes
from codec import FrameFormat, load_spec
from fixtures.flood import closed_within, raise_fd_limit
from fixtures.messages import financial
from fixtures.terminal import Terminal, connect_from
from proxy.access import Rejection
from proxy.app import App
from proxy.watch import Watch
from tests.conftest import Terminals, open_fds, proxy_config, start_proxy, start_switch

ROOT = Path(__file__).resolve().parents[2]
FD_SLACK = 2
# Time allowed, past a deadline, for the close to reach the client (generous: the machine
# may be loaded).
SLACK = 1.0


async def _server_until(app: App, condition: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until `condition` holds of the server's connections and refusals."""
    with trio.fail_after(5):
        await app.server.wait_until(condition)


# -- scenario 21 ---------------------------------------------------------------------------

MAX_FRAME = 4096
WARM_UP = 50
ATTEMPTS = 1000
# RSS is measured after a warm-up (the allocators have their arenas by then), so only what
# the attempts keep shows: about 4 KiB or more kept per attempt (a frame buffer, say) fails,
# while the growth measured without a leak is 0-12 KiB, loaded or not. The margin absorbs a
# new allocator arena or two.
RSS_GROWTH_LIMIT = 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("framing", "prefix"),
    [("binary2", struct.pack(">H", 65535)), ("ascii4", b"9999")],
)
async def test_oversized_length_prefix_is_refused_at_once_and_costs_nothing(
    nursery: trio.Nursery,
    terminals: Terminals,
    caplog: pytest.LogCaptureFixture,
    framing: str,
    prefix: bytes,
) -> None:
    # pytest keeps every captured record: the proxy's warning per refused frame would
    # count as growth here, though the proxy itself keeps nothing.
    caplog.set_level(logging.ERROR, logger="iso_proxy.server")
    switch = await start_switch(nursery)
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch.port},
            # A proxy waiting for the body would hit this deadline, long after the client's.
            listen={"framing": framing, "max_frame": MAX_FRAME, "frame_timeout": 30},
        ),
    )
    bystander = await terminals.connect(port, app.config.listen.endpoint.framing)
    assert (await bystander.request(financial(1))).get("39") == "00"
    fds = open_fds()

    async def attempt() -> None:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(prefix)
            with trio.fail_after(SLACK):
                assert await stream.receive_some(1) == b""  # EOF, and nothing before it

    for _ in range(WARM_UP):
        await attempt()
    gc.collect()
    before = rss_bytes(os.getpid())
    for n in range(ATTEMPTS):
        await attempt()
        if n % 100 == 0:
            assert (await bystander.request(financial(2 + n))).get("39") == "00"
    gc.collect()
    growth = rss_bytes(os.getpid()) - before

    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth} bytes"
    assert app.server.rejections == Counter({Rejection.BAD_FRAME: WARM_UP + ATTEMPTS})
    assert (await bystander.request(financial(9999))).get("39") == "00"
    assert switch.financial_total() == 2 + ATTEMPTS // 100
    await trio.testing.wait_all_tasks_blocked()  # the proxy's tasks finish what they began
    assert app.server.connections == 1
    assert open_fds() <= fds + FD_SLACK
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- scenario 22 ---------------------------------------------------------------------------

FRAME_TIMEOUT = 1.0
DRIP = 0.3  # seconds between the slowloris's bytes
IDLE_TIMEOUT = 0.8
SWITCH_DELAY = 2.0  # longer than two idle timeouts


async def _drip(
    stream: trio.abc.SendStream, data: bytes, sent: list[int], stop: trio.Event
) -> None:
    """Send `data` one byte every DRIP seconds, until all is sent, `stop` or a broken pipe."""
    try:
        for i in range(len(data)):
            if stop.is_set():
                return
            await stream.send_all(data[i : i + 1])
            sent.append(i)
            await trio.sleep(DRIP)
    except trio.BrokenResourceError:
        return


async def _keep_asking(
    terminal: Terminal, stop: trio.Event, on_answer: Callable[[float], None]
) -> None:
    """Purchases one after another, 20 ms apart, until `stop`; each must be answered RC 00.
    `on_answer` gets each round trip (seconds)."""
    stan = 1
    while not stop.is_set():
        start = trio.current_time()
        answer = await terminal.request(financial(stan, "TERMGOOD"))
        assert (answer.get("39"), answer.get("11")) == ("00", f"{stan:06d}")
        on_answer(trio.current_time() - start)
        stan += 1
        await trio.sleep(0.02)


async def test_slowloris_is_closed_at_the_frame_deadline_while_others_are_served(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch = await start_switch(nursery)
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch.port}, listen={"frame_timeout": FRAME_TIMEOUT, "idle_timeout": 30}
        ),
    )
    bystander = await terminals.connect(port)
    fds = open_fds()
    slow = await terminals.connect(port)
    data = slow.frame(financial(9, "TERMSLOW"))
    # Quiet first: the frame deadline runs from the frame's first byte, not the connection.
    await trio.sleep(FRAME_TIMEOUT / 2)

    sent: list[int] = []
    round_trips: list[float] = []
    stop = trio.Event()
    async with trio.open_nursery() as attack:
        first_byte = trio.current_time()
        attack.start_soon(_drip, slow.stream, data, sent, stop)
        attack.start_soon(_keep_asking, bystander, stop, round_trips.append)
        waited = await closed_within(slow.stream, FRAME_TIMEOUT + SLACK)
        closed_after = trio.current_time() - first_byte
        stop.set()
    await slow.aclose()

    assert waited is not None, "slowloris still connected past the frame deadline"
    assert FRAME_TIMEOUT <= closed_after < FRAME_TIMEOUT + SLACK
    assert 3 <= len(sent) < len(data)  # it kept trickling and never finished the frame
    assert len(round_trips) >= 5
    assert max(round_trips) < 0.5
    assert app.server.rejections == Counter({Rejection.FRAME_TIMEOUT: 1})
    assert switch.financial_total() == len(round_trips)  # the slow frame never got through
    await trio.testing.wait_all_tasks_blocked()
    assert app.server.connections == 1
    assert open_fds() <= fds + FD_SLACK


async def test_idle_connection_is_closed_but_one_awaiting_its_answer_is_not(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch = await start_switch(nursery, delay=SWITCH_DELAY)
    app, port = await start_proxy(
        nursery,
        proxy_config({"alpha": switch.port}, listen={"idle_timeout": IDLE_TIMEOUT}),
    )
    fds = open_fds()
    start = trio.current_time()
    silent = await terminals.connect(port)
    waiting = await terminals.connect(port)
    await waiting.send(financial(5))

    assert await closed_within(silent.stream, IDLE_TIMEOUT + SLACK) is not None
    assert trio.current_time() - start >= IDLE_TIMEOUT
    assert app.server.rejections == Counter({Rejection.IDLE_TIMEOUT: 1})

    with trio.fail_after(SWITCH_DELAY + SLACK):
        answer = await waiting.receive()
    assert answer.get("39") == "00"  # not closed while its answer was owed
    assert trio.current_time() - start >= SWITCH_DELAY

    # Answered and silent: now it is idle too.
    assert await closed_within(waiting.stream, IDLE_TIMEOUT + SLACK) is not None
    assert app.server.rejections == Counter({Rejection.IDLE_TIMEOUT: 2})
    for terminal in (silent, waiting):
        await terminal.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert app.server.connections == 0
    assert open_fds() <= fds + FD_SLACK


# -- scenario 23 ---------------------------------------------------------------------------

MAX_CONNECTIONS = 300
PER_IP = 100
FLOOD = 10_000
WIDE_FLOOD = 2_000
WIDE_SOURCES = ["127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"]


class _Flood:
    """`python -m fixtures.flood` running in its own process."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process

    async def summary(self) -> dict[str, Any]:
        """The JSON line it prints once every connection has its verdict."""
        assert self.process.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                chunk = await self.process.stdout.receive_some(4096)
                assert chunk, "the flood ended without a summary"
                line += chunk
        summary: dict[str, Any] = json.loads(line)
        return summary


@asynccontextmanager
async def _flooding(port: int, count: int, sources: list[str]) -> AsyncIterator[_Flood]:
    """A flood of `count` connections from `sources`, holding what the proxy let in until
    the block ends."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "fixtures.flood",
            "127.0.0.1",
            str(port),
            str(count),
            *(f"--source={source}" for source in sources),
            "--hold=30",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        yield _Flood(process)
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process)
    assert process.returncode == 0


async def _stop(process: trio.Process) -> None:
    """Close its stdin (it lets the held connections go and exits); kill it if it lingers."""
    assert process.stdin is not None and process.stdout is not None
    await process.stdin.aclose()
    with trio.move_on_after(10) as lingering:
        await process.wait()
    if lingering.cancelled_caught:
        process.kill()
        await process.wait()
    await process.stdout.aclose()


async def test_connection_flood_from_another_process(
    nursery: trio.Nursery,
    terminals: Terminals,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raise_fd_limit()
    switch = await start_switch(nursery)
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch.port},
            listen={"max_connections": MAX_CONNECTIONS, "max_connections_per_ip": PER_IP},
        ),
    )
    spec = load_spec("default")
    fds = open_fds()
    round_trips: list[float] = []
    at_answers: list[int] = []  # refusals so far, at each answer
    answered = Watch()
    stop = trio.Event()

    def on_answer(round_trip: float) -> None:
        round_trips.append(round_trip)
        at_answers.append(app.server.rejections.total())
        answered.changed()

    # One address floods: the per-address cap holds it to PER_IP connections, and a client
    # from another address, arriving mid-flood, is let in and served throughout.
    async with _flooding(port, FLOOD, ["127.0.0.1"]) as narrow, trio.open_nursery() as client:
        await _server_until(app, lambda: app.server.rejections.total() > 0)  # the flood is on
        real = terminals.adopt(
            Terminal(await connect_from("127.0.0.1", port, "127.0.0.2"), FrameFormat(), spec)
        )
        client.start_soon(_keep_asking, real, stop, on_answer)
        summary = await narrow.summary()
        refused = FLOOD - PER_IP
        assert summary | {"elapsed": 0, "slowest_close": 0} == {
            "opened": FLOOD,
            "closed_by_proxy": refused,
            "held": PER_IP,
            "errors": 0,
            "elapsed": 0,
            "slowest_close": 0,
            "held_by_source": {"127.0.0.1": PER_IP},
        }
        assert summary["slowest_close"] < 1.0
        assert app.server.rejections == Counter({Rejection.MAX_CONNECTIONS_PER_IP: refused})
        assert app.server.connections == PER_IP + 1
        assert at_answers and min(at_answers) < refused  # served while the flood was being refused

        # Many addresses flood: the total cap holds, and refusals stay fast.
        async with _flooding(port, WIDE_FLOOD, WIDE_SOURCES) as wide:
            wide_summary = await wide.summary()
            let_in = MAX_CONNECTIONS - PER_IP - 1
            assert (wide_summary["opened"], wide_summary["errors"]) == (WIDE_FLOOD, 0)
            assert (wide_summary["held"], wide_summary["closed_by_proxy"]) == (
                let_in,
                WIDE_FLOOD - let_in,
            )
            assert max(wide_summary["held_by_source"].values()) <= PER_IP
            assert wide_summary["slowest_close"] < 1.0
            assert app.server.connections == MAX_CONNECTIONS
            assert app.server.rejections == Counter(
                {
                    Rejection.MAX_CONNECTIONS_PER_IP: refused,
                    Rejection.MAX_CONNECTIONS: WIDE_FLOOD - let_in,
                }
            )
            # Full: a newcomer is refused at once; the client already in is still served.
            async with await connect_from("127.0.0.1", port, "127.0.0.3") as newcomer:
                assert await closed_within(newcomer, 1.0) is not None
            assert app.server.rejections[Rejection.MAX_CONNECTIONS] == WIDE_FLOOD - let_in + 1
            served = len(at_answers)
            with trio.fail_after(5):
                await answered.wait_until(lambda: len(at_answers) > served)
        stop.set()

    await _server_until(app, lambda: app.server.connections == 1)
    assert max(round_trips) < 1.0
    latecomer = terminals.adopt(
        Terminal(await connect_from("127.0.0.1", port, "127.0.0.3"), FrameFormat(), spec)
    )
    assert (await latecomer.request(financial(1, "TERMLATE"))).get("39") == "00"
    assert switch.financial_total() == len(at_answers) + 1
    for terminal in (real, latecomer):
        await terminal.aclose()
    await _server_until(app, lambda: app.server.connections == 0)
    assert open_fds() <= fds + FD_SLACK
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
