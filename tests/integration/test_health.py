"""Switch health over real sockets: black holes, silent transactions, flapping links."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import trio

from codec import Message
from fixtures.messages import echo, financial
from fixtures.sim_switch import SimSwitch
from tests.conftest import Terminals, pipelined_sessions, proxy_config, start_proxy, start_switch

# Echoes every 0.3 s, failures confirmed within 0.1 s each, two in a row to go down or up.
QUICK = {"echo_interval": 0.3, "echo_timeout": 0.1, "rise_interval": 0.05, "fall": 2, "rise": 2}


def _key(message: Message) -> tuple[str | None, str | None]:
    return message.get("41"), message.get("11")


def _silence(switch: SimSwitch, *, mute: bool) -> None:
    switch.options = dataclasses.replace(switch.options, mute=mute)


async def test_a_black_hole_switch_is_dropped_avoided_and_taken_back_when_healed(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery)
    app, port = await start_proxy(
        nursery, proxy_config({"alpha": alpha.port, "beta": beta.port}, health=QUICK)
    )
    alpha_links = app.pool.links["alpha"]
    terminal = await terminals.connect(port)

    _silence(alpha, mute=True)  # accepts, reads, never answers
    bound = QUICK["echo_interval"] + QUICK["echo_timeout"] * QUICK["fall"]
    with trio.fail_after(bound + 0.5):
        await app.pool.wait_until(lambda: not any(link.is_up for link in alpha_links))

    before = alpha.financial_total()
    for stan in range(1, 21):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert alpha.financial_total() == before  # nothing was sent to the black hole

    _silence(alpha, mute=False)
    with trio.fail_after(10):
        await app.pool.wait_until(lambda: all(link.is_up for link in alpha_links))
    for stan in range(21, 41):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    assert alpha.financial_total() == before + 10


async def test_a_switch_that_answers_echoes_but_not_transactions_is_taken_out(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch = await start_switch(nursery, drop=True)
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch.port},
            switch={"connections": 1, "timeout": 0.2},
            health={"timeout_threshold": 3},
        ),
    )
    link = app.pool.links["alpha"][0]
    terminal = await terminals.connect(port)
    for stan in (1, 2):
        assert (await terminal.request(financial(stan))).get("39") == "91"
    assert link.connects == 1 and link.is_up  # two timeouts in a row: still trusted
    assert (await terminal.request(financial(3))).get("39") == "91"
    with trio.fail_after(5):  # the third drops the connection; echoes bring a new one up
        await app.pool.wait_until(lambda: link.connects == 2 and link.is_up)


async def test_a_flapping_link_is_never_used_until_its_echoes_pass(
    nursery: trio.Nursery, terminals: Terminals, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = await start_switch(nursery, close_after=6)  # every connection dies young
    steady = await start_switch(nursery)
    _, port = await start_proxy(
        nursery,
        proxy_config({"alpha": flaky.port, "beta": steady.port}, health={"rise": 2}),
    )
    by_terminal = await pipelined_sessions(terminals, port, sessions=20, each=30)
    answers = [a for received in by_terminal.values() for a in received]

    assert len({_key(a) for a in answers}) == len(answers) == 600
    assert {a.get("39") for a in answers} <= {"00", "91"}
    upstream = Counter(_key(r) for r in [*flaky.transactions(), *steady.transactions()])
    assert max(upstream.values()) == 1
    assert len(flaky.openings) > 3  # it really flapped
    carried = 0
    for opening in flaky.openings:  # a connection carries traffic only after its echoes
        first_transaction = next(
            (i for i, label in enumerate(opening) if not label.startswith("08")), None
        )
        if first_transaction is None:  # no traffic yet (the run may end before its rise)
            continue
        carried += 1
        assert opening[:first_transaction].count("0800/301") >= 2, list(flaky.openings)
    assert carried > 1  # the first connection and at least one after it carried traffic
    assert "matches no request" not in caplog.text


async def test_a_request_written_to_a_link_that_dies_is_seen_by_one_switch_only(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    dying = await start_switch(nursery, close_after=2)  # its echo, then one request
    steady = await start_switch(nursery)
    _, port = await start_proxy(
        nursery,
        proxy_config({"alpha": dying.port, "beta": steady.port}, switch={"connections": 1}),
    )
    terminal = await terminals.connect(port)
    answers = [await terminal.request(financial(stan)) for stan in range(1, 5)]
    lost = [a for a in answers if a.get("39") == "91"]
    assert lost  # alpha took its turn and died with the request
    seen = Counter(_key(r) for r in [*dying.transactions(), *steady.transactions()])
    for answer in answers:
        assert seen[_key(answer)] == 1
    for answer in lost:
        assert _key(answer) in {_key(r) for r in dying.transactions()}


async def test_link_echoes_never_reach_a_terminal(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    switch = await start_switch(nursery)
    _, port = await start_proxy(
        nursery,
        proxy_config({"alpha": switch.port}, health={"echo_interval": 0.02, "echo_timeout": 0.02}),
    )
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(1))).get("39") == "00"
    with trio.fail_after(5):
        await switch.wait_until(lambda: switch.received["0800"] >= 20)  # 0810s flowed back
    reply = await terminal.request(echo(77))  # the next thing the terminal receives
    assert (reply.mti.code, reply.get("11")) == ("0810", "000077")
