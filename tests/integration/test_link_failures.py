"""Links that die, stall or answer late: nothing sent twice, nothing misdelivered."""

from __future__ import annotations

import logging
import struct
from collections import Counter

import pytest
import trio

from codec import FrameFormat, Message, encode, load_spec
from fixtures.messages import echo, financial
from fixtures.sim_switch import SimSwitch
from fixtures.terminal import Terminal
from proxy.upstream import WRITE_GRACE
from tests.conftest import (
    Terminals,
    pipelined_sessions,
    proxy_config,
    proxy_with_one_switch,
    start_proxy,
    start_switch,
    unused_port,
)


def _key(message: Message) -> tuple[str | None, str | None]:
    return message.get("41"), message.get("11")


async def test_links_dying_under_load_never_send_twice_or_fail_oddly(
    nursery: trio.Nursery, terminals: Terminals, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = await start_switch(nursery, close_after=4)  # an echo, 2 answers, then it closes
    steady = await start_switch(nursery)
    _, port = await start_proxy(nursery, proxy_config({"alpha": flaky.port, "beta": steady.port}))
    by_terminal = await pipelined_sessions(terminals, port, sessions=30, each=20)
    answers = [a for received in by_terminal.values() for a in received]

    assert len(answers) == 600
    assert len({_key(a) for a in answers}) == 600
    upstream = Counter(_key(r) for r in [*flaky.transactions(), *steady.transactions()])
    assert max(upstream.values()) == 1  # no request reached a switch twice
    approved = {_key(a) for a in answers if a.get("39") == "00"}
    declined = {_key(a) for a in answers if a.get("39") != "00"}
    assert approved | declined == {_key(a) for a in answers}
    assert {a.get("39") for a in answers} <= {"00", "91"}
    assert approved <= set(upstream)
    assert {_key(r) for r in steady.transactions()} <= approved  # steady answered them all
    assert not declined & {_key(r) for r in steady.transactions()}
    assert "matches no request" not in caplog.text  # no answer was lost on the way back


async def test_a_late_answer_is_never_given_to_a_newer_request(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch, _, terminal = await proxy_with_one_switch(
        nursery, terminals, switch={"timeout": 0.3}, delay=1.0
    )
    first = await terminal.request(financial(7, amount=1000))
    assert (first.get("39"), first.get("4")) == ("91", "000000001000")
    # The switch still owes the first answer: the key stays taken, so the same terminal
    # and STAN with another amount is refused rather than handed the first one's approval.
    second = await terminal.request(financial(7, amount=2000))
    assert (second.get("39"), second.get("4")) == ("94", "000000002000")
    assert switch.financial_total() == 1


async def test_a_connection_that_stops_answering_is_recycled(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch, app, terminal = await proxy_with_one_switch(
        nursery, terminals, switch={"connections": 1, "max_inflight": 2, "timeout": 0.2}, drop=True
    )
    link = app.pool.links["alpha"][0]
    assert (await terminal.request(financial(1))).get("39") == "91"
    with trio.fail_after(5):  # half its slots hold unanswered requests: reconnected
        await app.pool.wait_until(lambda: link.connects == 2 and link.is_up)
    # The old connection can no longer answer, so the key is free again.
    assert (await terminal.request(financial(1))).get("39") == "91"
    assert switch.financial_total() == 2


async def test_a_full_link_hands_the_request_to_its_sibling(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch, _, terminal = await proxy_with_one_switch(
        nursery,
        terminals,
        switch={"connections": 2, "max_inflight": 1, "timeout": 30},
        silent_stans=frozenset({"000001"}),
    )
    await terminal.send(financial(1))  # never answered: holds one link's only slot
    for stan in range(2, 8):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert switch.financial_total() == 7


async def test_an_answer_the_terminal_format_cannot_carry_becomes_rc_96(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    request = financial(12)
    size = len(encode(request, load_spec("default")))
    switch, _, terminal = await proxy_with_one_switch(
        nursery, terminals, listen={"max_frame": size + 2}
    )
    answer = await terminal.request(request)  # the approval adds 8 bytes (fields 38, 39)
    assert (answer.mti.code, answer.get("39"), answer.get("11")) == ("0210", "96", "000012")
    assert switch.financial_total() == 1


async def test_one_deadline_bounds_waiting_to_write_writing_and_waiting(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    sim = SimSwitch()

    async def answers_one_echo_then_stops_reading(stream: trio.SocketStream) -> None:
        async with stream:
            switch = Terminal(stream, sim.options.framing, sim.options.spec)
            probe = await switch.receive()
            reply = sim.respond(probe)
            assert reply is not None
            await switch.send(reply)
            await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, answers_one_echo_then_stops_reading, 0)
    switch_port = listeners[0].socket.getsockname()[1]
    _, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch_port},
            listen={"max_inflight_per_connection": 1000},
            switch={"connections": 1, "timeout": 3.0},
        ),
    )
    terminal = await terminals.connect(port)
    bulky = [financial(stan).with_fields({"48": "X" * 900}) for stan in range(1, 901)]
    started = trio.current_time()
    await terminal.stream.send_all(b"".join(terminal.frame(r) for r in bulky))
    answers = [await terminal.receive() for _ in bulky]
    elapsed = trio.current_time() - started
    assert {a.get("39") for a in answers} == {"91"}
    # One 3 s deadline (a write under way may finish within WRITE_GRACE), not a write
    # timeout followed by an answer timeout (6 s and more).
    assert elapsed < 3.0 + WRITE_GRACE + 1.0


async def test_the_sim_switch_survives_a_bad_connection(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch = await start_switch(nursery)
    bad = await terminals.connect(switch.port)
    await bad.stream.send_all(struct.pack(">H", 6) + b"02X0\x00\x00")
    assert await bad.receive_frame() is None
    good = terminals.adopt(
        await Terminal.connect("127.0.0.1", switch.port, FrameFormat(), switch.options.spec)
    )
    assert (await good.request(echo(1))).get("39") == "00"


async def test_a_switch_that_cannot_be_reached_is_named_at_warning_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong host or port shows at the default log level, without a line per retry."""
    caplog.set_level(logging.DEBUG, logger="iso_proxy.upstream")
    port = await unused_port()
    config = proxy_config({"alpha": port}, switch={"connections": 1})
    app, _ = await start_proxy(nursery, config, links_up=False)

    def attempts() -> list[logging.LogRecord]:
        return [r for r in caplog.records if f"connect to 127.0.0.1:{port}" in r.getMessage()]

    with trio.fail_after(10):
        await app.pool.wait_until(lambda: len(attempts()) >= 4)
    levels = [record.levelno for record in attempts()]
    assert levels[0] == logging.WARNING
    assert set(levels[1:]) == {logging.DEBUG}
    assert "refused" in attempts()[0].getMessage().lower()
