"""A write to a switch that fails before any byte leaves (the connection already broken,
the proxy not told yet) is no reason to call the request lost: nothing reached the
switch, so it goes out on another link, and no reversal will ever be owed for it."""

from __future__ import annotations

import random
import socket

import trio

from codec import FrameFormat
from fixtures.messages import financial
from fixtures.terminal import Terminal
from proxy.config import SwitchConfig
from proxy.errors import ProxyError
from proxy.keys import match_key
from proxy.pool import Pool
from tests.conftest import proxy_config
from tests.integration.test_health_clock import ScriptedSwitch


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
    nursery: trio.Nursery,
) -> None:
    switches = {"alpha": SocketSwitch(nursery), "beta": SocketSwitch(nursery)}
    try:
        await _fail_over_from_a_broken_write(nursery, switches)
    finally:
        nursery.cancel_scope.cancel()
        for switch in switches.values():
            switch.close()


async def _fail_over_from_a_broken_write(
    nursery: trio.Nursery, switches: dict[str, SocketSwitch]
) -> None:
    async def dial(switch: SwitchConfig) -> trio.abc.Stream:
        return await switches[switch.name].dial(switch)

    config = proxy_config({"alpha": 7001, "beta": 7002}, switch={"connections": 1})
    pool = Pool(config.switches, config.health, config.routing, random.Random(7), dial)
    await nursery.start(pool.run)
    await pool.wait_until(lambda: all(links[0].is_up for links in pool.links.values()))
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
