"""A write to a switch that fails before any byte leaves (the connection already broken,
the proxy not told yet) is no reason to call the request lost: nothing reached the
switch, so it goes out on another link, and no reversal will ever be owed for it."""

from __future__ import annotations

import random
import socket
from collections.abc import Mapping

import pytest
import trio
import trio.testing

import proxy.streams
from codec import FrameFormat
from fixtures.messages import financial
from fixtures.terminal import Terminal
from proxy.config import SwitchConfig
from proxy.errors import ProxyError
from proxy.keys import match_key
from proxy.pool import Pool
from tests.conftest import proxy_config
from tests.integration.test_health_clock import ScriptedSwitch
from tests.integration.test_link_writes import HeldWrites


class SocketSwitch(ScriptedSwitch):
    """A scripted switch over socket pairs: the proxy's end is a real SocketStream, so
    its writes take the one-system-call path (`proxy.streams.send_now`)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__(nursery)
        self.proxy_ends: list[trio.SocketStream] = []

    def close(self) -> None:
        for stream in [*self.proxy_ends, *self.ends]:
            assert isinstance(stream, trio.SocketStream)
            stream.socket.close()

    async def dial(self, switch: SwitchConfig) -> trio.abc.Stream:
        proxy_socket, switch_socket = trio.socket.socketpair()
        proxy_end, switch_end = trio.SocketStream(proxy_socket), trio.SocketStream(switch_socket)
        self.proxy_ends.append(proxy_end)
        self.ends.append(switch_end)
        self.connections += 1
        self.nursery.start_soon(
            self._serve, Terminal(switch_end, FrameFormat(), switch.endpoint.spec)
        )
        return proxy_end


async def test_a_write_that_fails_before_its_first_byte_goes_out_on_another_link(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    switches = {"alpha": SocketSwitch(nursery), "beta": SocketSwitch(nursery)}
    try:
        await _fail_over_from_a_broken_write(nursery, switches)
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(
            line.startswith("link alpha/") and "write refused before any byte left" in line
            for line in said
        ), said
    finally:
        nursery.cancel_scope.cancel()
        for switch in switches.values():
            switch.close()


async def _fail_over_from_a_broken_write(
    nursery: trio.Nursery, switches: dict[str, SocketSwitch]
) -> None:
    pool = await _two_switch_pool(nursery, switches)
    # alpha's connection can no longer be written to, though nothing tells the proxy so
    # (its reader still waits, the link is still up): the next write there fails at once.
    switches["alpha"].proxy_ends[0].socket.shutdown(socket.SHUT_WR)

    answers: dict[int, str] = {}
    for stan in (1, 2, 3, 4):  # round robin: some are first offered to alpha
        request = financial(stan, "TERM0001")
        try:
            answered = await pool.forward(request, match_key(request, ("41", "11")))
        except ProxyError as error:  # LinkLost would say it may have reached alpha
            answers[stan] = type(error).__name__
        else:
            answers[stan] = f"{answered.switch} {answered.response.get('39')}"
    assert all(answer.endswith(" 00") for answer in answers.values()), answers
    reached = [m.get("11") or "" for switch in switches.values() for m in switch.transactions]
    assert sorted(reached) == ["000001", "000002", "000003", "000004"]  # each once
    with trio.fail_after(5):  # alpha's write did fail: it closed and dialled again
        await pool.wait_until(lambda: switches["alpha"].connections == 2)
    assert [pool.in_flight(links[0]) for links in pool.links.values()] == [0, 0]


async def _two_switch_pool(
    nursery: trio.Nursery,
    switches: Mapping[str, ScriptedSwitch],
    dialled: dict[str, list[trio.abc.Stream]] | None = None,
) -> Pool:
    """A pool of alpha and beta, one link each, both up; `dialled`: the proxy's ends of
    each switch's connections, as they are made."""

    async def dial(switch: SwitchConfig) -> trio.abc.Stream:
        stream = await switches[switch.name].dial(switch)
        if dialled is not None:
            dialled.setdefault(switch.name, []).append(stream)
        return stream

    config = proxy_config({"alpha": 7001, "beta": 7002}, switch={"connections": 1})
    pool = Pool(config.switches, config.health, config.routing, random.Random(7), dial)
    await nursery.start(pool.run)
    await pool.wait_until(lambda: all(links[0].is_up for links in pool.links.values()))
    return pool


async def test_frames_waiting_behind_a_write_fail_over_when_theirs_leaves_nothing(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frames that gathered behind a write leave together in the next one; if that one
    fails before its first byte, every one of them goes to the other switch."""
    alpha, beta = HeldWrites(nursery), ScriptedSwitch(nursery)
    dialled: dict[str, list[trio.abc.Stream]] = {}
    pool = await _two_switch_pool(nursery, {"alpha": alpha, "beta": beta}, dialled)
    (alpha_end,) = dialled["alpha"]  # the proxy's end of alpha's connection
    alpha.held, alpha.writes = True, 0
    answers: dict[str, str] = {}

    async def forward(stan: int) -> None:
        request = financial(stan, "TERM0001")
        try:
            answered = await pool.forward(request, match_key(request, ("41", "11")))
        except ProxyError as error:
            answers[f"{stan:06d}"] = type(error).__name__
        else:
            answers[f"{stan:06d}"] = f"{answered.switch} {answered.response.get('39')}"

    send_now = proxy.streams.send_now

    def reset_by_alpha(stream: trio.abc.Stream, data: bytes | bytearray | memoryview) -> int:
        if stream is alpha_end:
            raise trio.BrokenResourceError("connection lost: Connection reset by peer")
        return send_now(stream, data)

    async with trio.open_nursery() as senders:
        for stan in range(1, 9):  # round robin: four for alpha, one held and three behind
            senders.start_soon(forward, stan)
        await trio.testing.wait_all_tasks_blocked()
        monkeypatch.setattr(proxy.streams, "send_now", reset_by_alpha)
        alpha.released.set()  # the held write ends; the next one, the riders', fails
    assert alpha.writes == 1 and len(alpha.transactions) == 1  # the held one, written
    written_to_alpha = {m.get("11") or "" for m in alpha.transactions}
    riders = {stan for stan in answers if stan not in written_to_alpha}
    assert len(beta.transactions) == len(riders) == 7  # three of them failed over
    assert {m.get("11") for m in beta.transactions} == riders
    assert all(answers[stan] == "beta 00" for stan in riders), answers
