"""The proxy path over real loopback sockets: terminals -> proxy -> simulated switches."""

from __future__ import annotations

import struct
from collections import Counter

import pytest
import trio
import trio.testing

from codec import FrameFormat, LengthPrefix, Message, Mti, decode
from fixtures.messages import echo, financial
from fixtures.sim_switch import SimSwitch
from fixtures.terminal import Terminal
from proxy.app import App
from proxy.health import LinkState
from tests.conftest import (
    Database,
    Terminals,
    metrics,
    nonzero_by,
    pipeline,
    pipelined_sessions,
    proxy_config,
    proxy_with_one_switch,
    start_killable_switch,
    start_proxy,
    start_switch,
    unused_port,
)


async def test_pipelined_terminals_with_colliding_stans_get_their_own_answers(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery)
    _, port = await start_proxy(nursery, proxy_config({"alpha": alpha.port, "beta": beta.port}))
    answers = await pipelined_sessions(terminals, port, sessions=20, each=50)

    assert len(answers) == 20
    for tid, received in answers.items():
        assert sorted(m.get("11") or "" for m in received) == [f"{s:06d}" for s in range(1, 51)]
        assert {m.get("41") for m in received} == {tid}
        assert {m.mti.code for m in received} == {"0210"}
        assert {m.get("39") for m in received} == {"00"}
    total = alpha.financial_total() + beta.financial_total()
    assert total == 1000
    assert abs(alpha.financial_total() - 500) <= 50
    assert abs(beta.financial_total() - 500) <= 50


async def test_backpressure_at_the_in_flight_cap_lets_one_through_an_answer_and_loses_nothing(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    """DESIGN scenario 19: with `max_inflight_per_connection: 4`, a terminal that pipelines
    100 requests has 4 at the switch at a time (the rest wait unread in its socket), and
    each answer lets one more through."""
    switch_port, streams = await _fake_switch(nursery)
    config = proxy_config(
        {"alpha": switch_port},
        listen={"max_inflight_per_connection": 4},
        switch={"connections": 1, "timeout": 30},
        health={"echo_interval": 60},  # no echo mixed into the requests
    )
    app, port = await start_proxy(nursery, config, links_up=False)
    link = app.pool.links["alpha"][0]
    switch = await _play_switch(app, streams, terminals)
    terminal = await terminals.connect(port)
    await terminal.stream.send_all(
        b"".join(terminal.frame(financial(stan, "CAPPED01")) for stan in range(1, 101))
    )
    with trio.fail_after(10):  # a cap below 4 would leave a receive waiting
        waiting = [await switch.receive() for _ in range(4)]
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert (app.server.in_flight, app.pool.in_flight(link)) == (4, 4)
        await _approve(switch, waiting.pop(0))
        waiting.append(await switch.receive())  # one answered, one more let through
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert (app.server.in_flight, app.pool.in_flight(link)) == (4, 4)
        for _ in range(95):  # the rest, one let through for each answer
            await _approve(switch, waiting.pop(0))
            waiting.append(await switch.receive())
        for request in waiting:
            await _approve(switch, request)
        answered = [await terminal.receive() for _ in range(100)]
    assert sorted(int(a.get("11") or 0) for a in answered) == list(range(1, 101))


async def test_a_killed_switch_reconnects_while_traffic_flows_elsewhere(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    beta = await start_switch(nursery)
    alpha, alpha_scope = await start_killable_switch(nursery)
    alpha_port = alpha.port
    app, port = await start_proxy(nursery, proxy_config({"alpha": alpha_port, "beta": beta.port}))
    alpha_links = app.pool.links["alpha"]
    terminal = await terminals.connect(port)

    for stan in range(1, 21):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert alpha.financial_total() == 10

    alpha_scope.cancel()
    await app.pool.wait_until(lambda: all(not link.is_up for link in alpha_links))
    before = beta.financial_total()
    for stan in range(21, 41):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert beta.financial_total() == before + 20

    revived = SimSwitch()
    revived.options = alpha.options.__class__(port=alpha_port)
    await nursery.start(revived.run)
    await app.pool.wait_until(lambda: all(link.is_up for link in alpha_links))
    assert all(link.connects == 2 for link in alpha_links)
    for stan in range(41, 61):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert revived.financial_total() == 10


async def test_a_switch_that_never_answers_gives_rc_91_at_the_deadline(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch, _, terminal = await proxy_with_one_switch(
        nursery, terminals, switch={"timeout": 0.5}, drop=True
    )
    started = trio.current_time()
    response = await terminal.request(financial(7))
    elapsed = trio.current_time() - started
    assert (response.mti.code, response.get("39"), response.get("11")) == ("0210", "91", "000007")
    assert elapsed >= 0.5
    assert switch.financial_total() == 1


async def test_no_link_up_answers_rc_91_at_once(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    """DESIGN scenario 10: every switch down means RC 91 at once; nothing waits for a link
    to come back (200 requests at once leave nothing in flight)."""
    dead_port = await unused_port()
    app, port = await start_proxy(nursery, proxy_config({"alpha": dead_port}), links_up=False)
    terminal = await terminals.connect(port)
    with trio.fail_after(2):  # far below the switch's 5 s timeout
        response = await terminal.request(financial(1))
        assert response.get("39") == "91"
        answers = await pipelined_sessions(terminals, port, sessions=4, each=50)
    assert [a.get("39") for each in answers.values() for a in each] == ["91"] * 200
    assert app.server.in_flight == 0


async def test_a_slow_switch_within_its_budget_causes_no_false_timeouts(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    """DESIGN scenario 5: a switch that takes 0.8 of its 2.5 s timeout for every answer, 50
    requests at once: all approved, none counted as timed out."""
    switch = await start_switch(nursery, delay=2.0)
    config = proxy_config({"alpha": switch.port}, switch={"timeout": 2.5})
    app, port = await start_proxy(nursery, config)
    answers = await pipelined_sessions(terminals, port, sessions=5, each=10)
    assert [a.get("39") for each in answers.values() for a in each] == ["00"] * 50
    assert nonzero_by(await metrics(app), "isoproxy_timeouts_total", "switch") == {}


async def test_a_link_lost_mid_flight_fails_its_requests_at_once(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch, _, terminal = await proxy_with_one_switch(
        nursery, terminals, switch={"connections": 1, "timeout": 30}, close_after=2
    )
    with trio.fail_after(5):  # not at the 30 s timeout
        response = await terminal.request(financial(3))
    assert response.get("39") == "91"
    assert switch.financial_total() == 1


async def test_the_proxy_answers_echo_tests_itself(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch, _, terminal = await proxy_with_one_switch(nursery, terminals)
    response = await terminal.request(echo(42))
    assert (response.mti.code, response.get("39"), response.get("11"), response.get("70")) == (
        "0810",
        "00",
        "000042",
        "301",
    )
    assert "000042" not in {r.get("11") for r in switch.requests}


async def test_same_key_in_flight_is_refused_with_rc_94_and_not_forwarded(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch, _, terminal = await proxy_with_one_switch(nursery, terminals, delay=0.3)
    received = await pipeline(terminal, [financial(5), financial(5)])
    assert Counter(m.get("39") for m in received) == Counter({"00": 1, "94": 1})
    assert switch.financial_total() == 1


async def test_messages_without_optional_fields_are_forwarded(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch, _, terminal = await proxy_with_one_switch(nursery, terminals)
    request = financial(9, optional=False)
    response = await terminal.request(request)
    assert response.get("39") == "00"
    assert switch.requests[-1] == request


async def test_classes_1_2_and_4_and_their_repeats_are_forwarded(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch, _, terminal = await proxy_with_one_switch(nursery, terminals)
    mtis = ["0100", "0101", "0200", "0201", "0220", "0221", "0400", "0401", "0420", "0421"]
    for stan, mti in enumerate(mtis, start=1):
        response = await terminal.request(financial(stan, mti=mti))
        assert response.mti == Mti.parse(mti).response()
        assert response.get("39") == "00"
    assert switch.received - Counter({"0800": switch.received["0800"]}) == Counter(mtis)


async def test_terminal_and_switch_speak_different_framings(
    nursery: trio.Nursery,
    terminals: Terminals,
) -> None:
    switch = await start_switch(nursery)  # binary2, default spec
    _, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch.port},
            listen={"framing": "ascii4", "tpdu": True, "spec": "default_ascii"},
        ),
    )
    terminal = await terminals.connect(
        port, FrameFormat(LengthPrefix.ASCII4, tpdu=True), "default_ascii"
    )
    await terminal.send(financial(11), tpdu=bytes.fromhex("6000120034"))
    frame = await terminal.receive_frame()
    assert frame is not None
    assert frame.tpdu == bytes.fromhex("6000340012")
    response = decode(frame.message, terminal.spec)
    assert (response.mti.code, response.get("39"), response.get("11")) == ("0210", "00", "000011")
    assert switch.financial_total() == 1


async def _fake_switch(
    nursery: trio.Nursery,
) -> tuple[int, trio.MemoryReceiveChannel[trio.SocketStream]]:
    """A bare listener: the test plays the switch on each connection the proxy opens."""
    accepted, streams = trio.open_memory_channel[trio.SocketStream](8)

    async def handler(stream: trio.SocketStream) -> None:
        await accepted.send(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return listeners[0].socket.getsockname()[1], streams


async def _play_switch(
    app: App, streams: trio.MemoryReceiveChannel[trio.SocketStream], terminals: Terminals
) -> Terminal:
    """The next connection the proxy opens to a `_fake_switch` (its only link, alpha's),
    with its echo answered and the link up: the test plays the switch on it."""
    spec = app.config.switches[0].endpoint.spec
    switch = terminals.adopt(Terminal(await streams.receive(), FrameFormat(), spec))
    probe = await switch.receive()
    assert (probe.mti.code, probe.get("70")) == ("0800", "301")
    await _approve(switch, probe)
    link = app.pool.links["alpha"][0]
    await app.pool.wait_until(lambda: link.is_up)
    return switch


async def _approve(switch: Terminal, request: Message) -> None:
    """Answer `request` with RC 00, as the switch."""
    await switch.send(request.with_fields({"39": "00"}, mti=request.mti.response()))


async def test_switch_traffic_the_proxy_did_not_ask_for(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """DESIGN scenarios 6 and 7: unsolicited answers and a duplicate answer are counted,
    never delivered; the transaction is journaled once, with the first answer."""
    switch_port, streams = await _fake_switch(nursery)
    config = proxy_config({"alpha": switch_port}, switch={"connections": 1}, store=database.store())
    app, port = await start_proxy(nursery, config, links_up=False)
    assert app.store is not None
    with trio.fail_after(10):
        await app.store.wait_ready()
    # The proxy's echo comes first; answered, it brings the link up.
    switch = await _play_switch(app, streams, terminals)
    terminal = await terminals.connect(port)

    # The switch's own echo is answered on the link.
    answer = await switch.request(echo(901))
    assert (answer.mti.code, answer.get("39"), answer.get("11")) == ("0810", "00", "000901")

    # An answer nobody asked for reaches no terminal; a duplicate answer is delivered once.
    await switch.send(financial(555, "NOBODY01").with_fields({"39": "00"}, mti=Mti.parse("0210")))
    await terminal.send(financial(21))
    request = await switch.receive()
    response = request.with_fields({"39": "00", "38": "AUTH01"}, mti=request.mti.response())
    await switch.send(response)
    await switch.send(response.with_fields({"38": "AUTH02"}))
    first = await terminal.receive()
    assert (first.get("11"), first.get("38")) == ("000021", "AUTH01")
    assert (await terminal.request(echo(22))).mti.code == "0810"  # nothing else was queued
    assert app.pool.links["alpha"][0].state is LinkState.UP
    counted = await metrics(app)  # the echo's round trip came after the duplicate
    assert counted[("isoproxy_unmatched_responses_total", ())] == 2  # NOBODY01, AUTH02
    assert counted[("isoproxy_late_responses_total", ())] == 0
    rows = await database.fetch("SELECT stan, state, auth_code FROM transactions")
    assert rows == [{"stan": "000021", "state": "answered", "auth_code": "AUTH01"}]


async def test_a_switch_down_at_start_is_connected_when_it_comes_up(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch_port = await unused_port()
    app, port = await start_proxy(nursery, proxy_config({"alpha": switch_port}), links_up=False)
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(1))).get("39") == "91"

    switch = await start_switch(nursery, port=switch_port)
    links = app.pool.links["alpha"]
    with trio.fail_after(5):
        await app.pool.wait_until(lambda: all(link.is_up for link in links))
    assert (await terminal.request(financial(2))).get("39") == "00"
    assert switch.financial_total() == 1


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(struct.pack(">H", 60_000), id="length prefix over max_frame"),
        pytest.param(b"\x00\x0bnot iso8583", id="a frame that does not decode"),
    ],
)
async def test_a_bad_frame_from_a_switch_fails_its_pending_requests_at_once_and_reconnects(
    nursery: trio.Nursery, terminals: Terminals, bad: bytes
) -> None:
    """DESIGN scenario 9: the link is closed and dialled again; the requests written on it
    are answered 91 at once, not at their (30 s) deadline; the new connection serves."""
    switch_port, streams = await _fake_switch(nursery)
    config = proxy_config({"alpha": switch_port}, switch={"connections": 1, "timeout": 30})
    app, port = await start_proxy(nursery, config, links_up=False)
    link = app.pool.links["alpha"][0]
    switch = await _play_switch(app, streams, terminals)
    first, second = [await terminals.connect(port) for _ in range(2)]
    await first.send(financial(31, "BADFRAM1"))
    await second.send(financial(32, "BADFRAM2"))
    assert {(await switch.receive()).get("11") for _ in range(2)} == {"000031", "000032"}

    await switch.stream.send_all(bad)
    with trio.fail_after(3):  # far inside the requests' own deadline
        answers = [await first.receive(), await second.receive()]
        assert [a.get("39") for a in answers] == ["91", "91"]
        assert await switch.stream.receive_some(100) == b""  # the proxy closed its side
        switch = await _play_switch(app, streams, terminals)  # it dialled again
    assert link.connects == 2
    reply = trio.Event()

    async def answer_one() -> None:
        await _approve(switch, await switch.receive())
        reply.set()

    nursery.start_soon(answer_one)
    assert (await first.request(financial(33, "BADFRAM1"))).get("39") == "00"
    await reply.wait()
