"""Echo cadence and health thresholds, to the second, on a mock clock over in-memory streams."""

from __future__ import annotations

import contextlib
import random

import pytest
import trio
import trio.testing

from codec import FrameFormat, Message
from fixtures.messages import financial
from fixtures.sim_switch import SimSwitch
from fixtures.terminal import Terminal
from proxy.config import SwitchConfig
from proxy.errors import ProxyError
from proxy.health import LinkState
from proxy.keys import match_key
from proxy.pool import Pool
from tests.conftest import proxy_config

HEALTH = {"echo_interval": 10, "echo_timeout": 3, "rise_interval": 1, "rise": 2, "fall": 3}


class ScriptedSwitch:
    """The far end of each in-memory connection: records when each 0800 left the proxy,
    answers while `answering` is set, and answers transactions like the simulated switch."""

    def __init__(self, nursery: trio.Nursery, *, lockstep: bool = False) -> None:
        self.nursery = nursery
        self.lockstep = lockstep  # the proxy's writes block until this end reads
        self._reading = trio.CancelScope()
        self._stopped = False
        self.ends: list[trio.abc.Stream] = []
        self.answering = True
        self.sign_on_rc = "00"
        self.echo_rc = "00"
        self.hang_up_after_echo: int | None = None  # close right after answering this echo
        self.echo_times: list[float] = []
        self.network_codes: list[str] = []
        self.transactions: list[Message] = []
        self.connections = 0
        self.closed = trio.Event()

    async def dial(self, switch: SwitchConfig) -> trio.abc.Stream:
        pair = (
            trio.testing.lockstep_stream_pair if self.lockstep else trio.testing.memory_stream_pair
        )
        proxy_end, switch_end = pair()
        self.ends.append(switch_end)
        self.connections += 1
        self.nursery.start_soon(
            self._serve, Terminal(switch_end, FrameFormat(), switch.endpoint.spec)
        )
        return proxy_end

    async def _serve(self, far: Terminal) -> None:
        sim = SimSwitch()
        while True:
            with trio.CancelScope() as self._reading:
                if self._stopped:
                    self._reading.cancel()
                frame = await far.receive_frame()
            if self._reading.cancelled_caught:
                await trio.sleep_forever()  # stopped reading for good
            if frame is None:
                break
            request = far.decode(frame)
            reply = sim.respond(request)
            if request.mti.message_class == 8:
                self.network_codes.append(request.get("70") or "")
                if request.get("70") == "301":
                    self.echo_times.append(trio.current_time())
                    if reply is not None:
                        reply = reply.with_fields({"39": self.echo_rc})
                elif reply is not None:
                    reply = reply.with_fields({"39": self.sign_on_rc})
            else:
                self.transactions.append(request)
            if self.answering and reply is not None:
                with contextlib.suppress(trio.BrokenResourceError):  # the proxy left
                    await far.send(reply)
            if self.hang_up_after_echo == len(self.echo_times) and request.get("70") == "301":
                await far.stream.aclose()
                break
        self.closed.set()

    def stop_reading(self) -> None:
        self._stopped = True
        self._reading.cancel()


async def _pool(
    nursery: trio.Nursery, switch: ScriptedSwitch, sign_on: bool = False, **health: float
) -> Pool:
    config = proxy_config(
        {"alpha": 7001},
        switch={"connections": 1, "sign_on": sign_on},
        health={**HEALTH, **health},
    )
    pool = Pool(config.switches, config.health, config.routing, random.Random(7), switch.dial)
    await nursery.start(pool.run)
    return pool


async def test_echo_cadence_rise_and_fall_exactly_as_configured(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = ScriptedSwitch(nursery)
    start = trio.current_time()
    pool = await _pool(nursery, switch)
    link = pool.links["alpha"][0]

    # Probation: an echo at once, the next after rise_interval; up after `rise` good ones.
    await pool.wait_until(lambda: link.is_up)
    assert trio.current_time() - start == pytest.approx(1.0)
    assert [t - start for t in switch.echo_times] == pytest.approx([0.0, 1.0])

    # Up: one echo every echo_interval, whether or not traffic flows.
    answer = (await pool.forward(financial(5), match_key(financial(5), ("41", "11")))).response
    assert (answer.mti.code, answer.get("11")) == ("0210", "000005")  # not an 0810
    await trio.sleep_until(start + 31.5)
    assert [t - start for t in switch.echo_times] == pytest.approx([0, 1, 11, 21, 31])
    assert len(link.echo_rtts) == 5

    # The switch stops answering: the echo at 41 fails at 44; the next ones leave at once
    # and fail at 47 and 50: the third failure in a row drops the connection, within
    # echo_interval + echo_timeout x fall of the switch going silent.
    switch.answering = False
    await pool.wait_until(lambda: link.state is LinkState.DOWN)
    assert trio.current_time() - start == pytest.approx(50.0)
    assert [t - start for t in switch.echo_times[-3:]] == pytest.approx([41, 44, 47])
    assert link.echoes_failed == 3

    # It reconnects (backoff) and is on probation until `rise` good echoes in a row.
    switch.answering = True
    await pool.wait_until(lambda: link.is_up)
    assert switch.connections == 2
    reconnected = switch.echo_times[-2]
    assert switch.echo_times[-1] - reconnected == pytest.approx(1.0)
    assert trio.current_time() - reconnected == pytest.approx(1.0)
    assert [r.get("11") for r in switch.transactions] == ["000005"]


async def test_echoes_failing_on_probation_never_bring_a_link_up(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = ScriptedSwitch(nursery)
    switch.answering = False
    start = trio.current_time()
    pool = await _pool(nursery, switch, rise_interval=1, echo_timeout=0.5)
    link = pool.links["alpha"][0]
    await pool.wait_until(lambda: link.state is LinkState.DOWN and link.connects == 1)
    # Echoes at 0, 0.5 and 1, each failing after 0.5 s: dropped at 1.5, never up.
    assert trio.current_time() - start == pytest.approx(1.5)
    assert [t - start for t in switch.echo_times] == pytest.approx([0, 0.5, 1])


async def test_sign_on_before_echoes_and_sign_off_on_a_clean_shutdown(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = ScriptedSwitch(nursery)
    async with trio.open_nursery() as proxy:
        pool = await _pool(proxy, switch, sign_on=True)
        link = pool.links["alpha"][0]
        await pool.wait_until(lambda: link.is_up)
        assert switch.network_codes == ["001", "301", "301"]
        proxy.cancel_scope.cancel()
    await switch.closed.wait()
    assert switch.network_codes == ["001", "301", "301", "002"]


async def test_a_refused_sign_on_keeps_the_link_out_of_use(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = ScriptedSwitch(nursery)
    switch.sign_on_rc = "91"
    pool = await _pool(nursery, switch, sign_on=True)
    link = pool.links["alpha"][0]
    await pool.wait_until(lambda: link.connects == 3)
    assert set(switch.network_codes) == {"001"}  # no echo, no traffic: it never came up
    assert not link.is_up


async def test_failover_before_write_is_answered_normally(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    alpha = ScriptedSwitch(nursery, lockstep=True)
    beta = ScriptedSwitch(nursery)
    beta.answering = False  # beta stays on probation for now
    dialers = {"alpha": alpha.dial, "beta": beta.dial}

    async def dial(switch: SwitchConfig) -> trio.abc.Stream:
        return await dialers[switch.name](switch)

    config = proxy_config(
        {"alpha": 7001, "beta": 7002}, switch={"connections": 1}, health={**HEALTH, "fall": 99}
    )
    pool = Pool(config.switches, config.health, config.routing, random.Random(7), dial)
    await nursery.start(pool.run)
    alpha_link, beta_link = pool.links["alpha"][0], pool.links["beta"][0]
    await pool.wait_until(lambda: alpha_link.is_up)

    outcomes: dict[str, str] = {}

    async def forward(stan: int) -> None:
        request = financial(stan)
        try:
            answer = (await pool.forward(request, match_key(request, ("41", "11")))).response
            outcomes[request.get("11") or ""] = f"{answer.mti}/{answer.get('39')}"
        except ProxyError as error:
            outcomes[request.get("11") or ""] = type(error).__name__

    alpha.stop_reading()  # R1's write to alpha blocks; R2 queues behind it
    nursery.start_soon(forward, 1)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(forward, 2)
    await trio.testing.wait_all_tasks_blocked()
    assert outcomes == {}

    beta.answering = True
    await pool.wait_until(lambda: beta_link.is_up)
    await alpha.ends[-1].aclose()  # alpha dies: R1 was (maybe) written, R2 was not
    await pool.wait_until(lambda: len(outcomes) == 2)
    assert outcomes == {"000001": "LinkLost", "000002": "0210/00"}
    assert [r.get("11") for r in beta.transactions] == ["000002"]
    assert alpha.transactions == []


async def test_a_link_whose_switch_hangs_up_as_it_rises_never_shows_up(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = ScriptedSwitch(nursery)
    switch.hang_up_after_echo = 2  # answers the echo that completes `rise`, then closes
    start = trio.current_time()
    pool = await _pool(nursery, switch)
    link = pool.links["alpha"][0]
    with trio.fail_after(1.03):  # before the first reconnect (backoff >= 0.04 s after 1.0)
        await pool.wait_until(lambda: link.connects == 1 and link.state is LinkState.DOWN)
    assert trio.current_time() - start == pytest.approx(1.0)
    assert not link.is_up


async def test_declined_echoes_are_spaced_not_fired_in_a_burst(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = ScriptedSwitch(nursery)
    start = trio.current_time()
    pool = await _pool(nursery, switch)
    link = pool.links["alpha"][0]
    await pool.wait_until(lambda: link.is_up)
    await trio.sleep_until(start + 10.5)
    switch.echo_rc = "91"  # answered, but refused
    await pool.wait_until(lambda: link.state is LinkState.DOWN)
    # Declined at 11, then again after rise_interval each time: dropped at 13, not at 11.
    assert [t - start for t in switch.echo_times[-3:]] == pytest.approx([11, 12, 13])
    assert trio.current_time() - start == pytest.approx(13.0)


async def test_a_switch_replaced_gets_connections_never_named_like_the_old_ones(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A request is tied to a connection by name: the old links of a replaced switch,
    still closing, must not fail the new links' requests by sharing their names."""
    switch = ScriptedSwitch(nursery)
    pool = await _pool(nursery, switch)
    old = pool.links["alpha"][0]
    await pool.wait_until(lambda: old.is_up)
    config = pool.switches["alpha"]
    await pool.remove_switch("alpha").wait()
    pool.add_switch(config)
    new = pool.links["alpha"][0]
    await pool.wait_until(lambda: new.is_up)
    assert new.name == old.name and new.connection != old.connection
