"""The Postgres journal, end to end: claims, outcomes, duplicates, replays, two instances."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio

from codec import Message, Mti
from fixtures.chaos import ChaosProxy, Mode
from fixtures.messages import TEST_PAN, echo, financial
from fixtures.sim_switch import SimSwitch
from proxy.app import App
from proxy.decisions import Duplicate
from tests.conftest import (
    Database,
    Terminals,
    all_links,
    pipeline,
    proxy_config,
    start_proxy,
    start_switch,
    unused_port,
)

TRACK2 = f"{TEST_PAN}=2512101123456789"
PIN_BLOCK = "0412AC89ABCDEF67"


async def _journaled(
    nursery: trio.Nursery, database: Database, **switch_options: Any
) -> tuple[SimSwitch, App, int]:
    switch = await start_switch(nursery, **switch_options)
    app, port = await start_proxy(
        nursery, proxy_config({"alpha": switch.port}, store=database.store())
    )
    assert app.store is not None
    with trio.fail_after(10):
        await app.store.wait_ready()
    return switch, app, port


async def test_fifty_identical_requests_at_once_make_one_row_and_one_forward(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch, _, port = await _journaled(nursery, database, delay=0.05)
    request = financial(42)
    answers: list[Message] = []

    async def send() -> None:
        terminal = await terminals.connect(port)
        answers.append(await terminal.request(request))

    async with trio.open_nursery() as senders:
        for _ in range(50):
            senders.start_soon(send)

    assert switch.financial_total() == 1
    assert len(answers) == 50
    assert {(a.mti.code, a.get("39"), a.get("38"), a.get("11")) for a in answers} == {
        ("0210", "00", "A00042", "000042")
    }
    rows = await database.fetch("SELECT state, rc, auth_code, switch, link FROM transactions")
    assert len(rows) == 1
    assert rows[0]["link"] in ("alpha/0", "alpha/1")
    assert {k: rows[0][k] for k in ("state", "rc", "auth_code", "switch")} == {
        "state": "answered",
        "rc": "00",
        "auth_code": "A00042",
        "switch": "alpha",
    }


async def test_a_repeat_after_completion_gets_the_stored_answer(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch, _, port = await _journaled(nursery, database)
    terminal = await terminals.connect(port)
    original = financial(7)
    first = await terminal.request(original)
    repeat = await terminal.request(original.with_fields({}, mti=Mti.parse("0201")))
    again = await terminal.request(original)  # an identical re-send
    assert switch.financial_total() == 1
    for answer in (repeat, again):
        assert answer.mti.code == "0210"
        assert (answer.get("38"), answer.get("39"), answer.get("11")) == (
            first.get("38"),
            first.get("39"),
            "000007",
        )
        assert answer.get("2") == TEST_PAN  # the switch echoed it; the journal did not keep it


async def test_a_repeat_whose_original_is_unknown_is_forwarded_once_as_the_transaction(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """DESIGN scenario 15: a 0201 whose 0200 never came (lost before the proxy) goes to
    the switch as it is, once; its own repeat, and the late original, get its answer."""
    switch, _, port = await _journaled(nursery, database)
    terminal = await terminals.connect(port)
    original = financial(8)
    repeat = original.with_fields({}, mti=Mti.parse("0201"))
    first = await terminal.request(repeat)
    second = await terminal.request(repeat)
    late_original = await terminal.request(original)
    assert [r.mti.code for r in switch.transactions()] == ["0201"]
    for answer in (first, second, late_original):
        assert (answer.mti.code, answer.get("39"), answer.get("11")) == ("0210", "00", "000008")
    rows = await database.fetch("SELECT mti, state, rc FROM transactions")
    assert rows == [{"mti": "0201", "state": "answered", "rc": "00"}]


async def test_the_same_key_with_other_content_gets_rc_94(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch, app, port = await _journaled(nursery, database)
    terminal = await terminals.connect(port)
    moment = datetime.now(UTC)
    assert (await terminal.request(financial(8, amount=1000, when=moment))).get("39") == "00"
    other = await terminal.request(financial(8, amount=2000, when=moment))
    assert (other.get("39"), other.get("4")) == ("94", "000000002000")
    assert switch.financial_total() == 1
    assert len(await database.fetch("SELECT 1 FROM transactions")) == 1
    assert app.forwarder.duplicates == Counter({Duplicate.REJECT: 1})


async def test_the_same_stan_on_another_day_is_a_new_transaction(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch, _, port = await _journaled(nursery, database)
    terminal = await terminals.connect(port)
    today = datetime.now(UTC)
    for moment in (today - timedelta(days=1), today):
        request = financial(9, when=moment).with_fields({"37": None})  # RRN left out
        assert (await terminal.request(request)).get("39") == "00"
    assert switch.financial_total() == 2
    rows = await database.fetch("SELECT tx_date FROM transactions ORDER BY tx_date")
    assert [r["tx_date"] for r in rows] == [(today - timedelta(days=1)).date(), today.date()]


async def test_the_same_stan_across_new_year_is_a_new_transaction(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch = await start_switch(nursery)
    received = [datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC)]
    app, port = await start_proxy(
        nursery,
        proxy_config({"alpha": switch.port}, store=database.store()),
        clock=lambda: received[0],
    )
    assert app.store is not None
    await app.store.wait_ready()
    terminal = await terminals.connect(port)
    # Sent at 23:59:57 on 31 Dec, received just before midnight...
    old_year = financial(5, when=datetime(2026, 12, 31, 23, 59, 57)).with_fields({"37": None})
    assert (await terminal.request(old_year)).get("39") == "00"
    # ... its repeat arrives after midnight: still last year's transaction, replayed.
    received[0] = datetime(2027, 1, 1, 0, 0, 3, tzinfo=UTC)
    repeat = old_year.with_fields({}, mti=Mti.parse("0201"))
    assert (await terminal.request(repeat)).get("39") == "00"
    # The same STAN sent in the new year is a new transaction.
    new_year = financial(5, when=datetime(2027, 1, 1, 0, 0, 2)).with_fields({"37": None})
    assert (await terminal.request(new_year)).get("39") == "00"
    assert switch.financial_total() == 2
    rows = await database.fetch("SELECT tx_date FROM transactions ORDER BY tx_date")
    assert [r["tx_date"].isoformat() for r in rows] == ["2026-12-31", "2027-01-01"]


async def test_two_instances_on_one_database_never_forward_a_duplicate(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch = await start_switch(nursery, delay=0.2)
    config = proxy_config({"alpha": switch.port}, store=database.store())
    first, first_port = await start_proxy(nursery, config)
    second, second_port = await start_proxy(nursery, config)
    for app in (first, second):
        assert app.store is not None
        await app.store.wait_ready()
    request = financial(11)
    answers: list[Message] = []

    async def send(port: int) -> None:
        terminal = await terminals.connect(port)
        answers.append(await terminal.request(request))

    async with trio.open_nursery() as senders:  # in flight on one, joined by the other
        senders.start_soon(send, first_port)
        senders.start_soon(send, second_port)
    terminal = await terminals.connect(second_port)
    answers.append(await terminal.request(request))  # after completion: replayed
    assert switch.financial_total() == 1
    assert {(a.get("39"), a.get("38")) for a in answers} == {("00", "A00011")}


async def test_no_card_data_in_the_table_or_the_logs(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    switch, _, port = await _journaled(nursery, database)
    terminal = await terminals.connect(port)
    for stan in range(1, 4):
        request = financial(stan).with_fields({"35": TRACK2, "52": PIN_BLOCK})
        assert (await terminal.request(request)).get("39") == "00"
    assert switch.financial_total() == 3
    rows = await database.fetch("SELECT t::text AS row FROM transactions t")
    assert len(rows) == 3
    for text in [r["row"] for r in rows] + [caplog.text]:
        assert TEST_PAN not in text
        assert TRACK2.split("=")[1] not in text
        assert PIN_BLOCK not in text
    masked = await database.fetch("SELECT DISTINCT pan_masked FROM transactions")
    assert masked == [{"pan_masked": "411111******1111"}]


async def _store_behind_chaos(
    nursery: trio.Nursery, database: Database, mode: Mode
) -> tuple[SimSwitch, App, int, ChaosProxy]:
    chaos, dsn = await database.behind_chaos(nursery, mode)
    switch = await start_switch(nursery)
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch.port}, store={"dsn": dsn, "schema": database.schema, "timeout": 1}
        ),
    )
    return switch, app, port, chaos


async def test_postgres_down_at_start_then_up(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch, app, port, chaos = await _store_behind_chaos(nursery, database, Mode.REFUSE)
    assert app.store is not None and not app.store.ready  # started all the same
    terminal = await terminals.connect(port)
    with trio.fail_after(1):  # at once, not after store.timeout
        assert (await terminal.request(financial(1))).get("39") == "96"
    assert (await terminal.request(echo(2))).get("39") == "00"  # the proxy itself still works
    chaos.mode = Mode.RELAY
    with trio.fail_after(15):
        await app.store.wait_ready()
    assert (await terminal.request(financial(3))).get("39") == "00"
    assert [r.get("11") for r in switch.transactions()] == ["000003"]  # never unclaimed


async def test_postgres_lost_mid_run_means_rc_96_and_nothing_forwarded_until_back(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch, app, port, chaos = await _store_behind_chaos(nursery, database, Mode.RELAY)
    assert app.store is not None
    with trio.fail_after(10):
        await app.store.wait_ready()
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(1))).get("39") == "00"

    chaos.mode = Mode.REFUSE
    chaos.sever()
    for stan in (2, 3, 4):
        with trio.fail_after(2):
            assert (await terminal.request(financial(stan))).get("39") == "96"
    assert not app.store.ready

    chaos.mode = Mode.RELAY
    with trio.fail_after(15):
        await app.store.wait_ready()
    assert (await terminal.request(financial(5))).get("39") == "00"
    assert [r.get("11") for r in switch.transactions()] == ["000001", "000005"]
    rows = await database.fetch("SELECT stan, state FROM transactions ORDER BY stan")
    assert rows == [
        {"stan": "000001", "state": "answered"},
        {"stan": "000005", "state": "answered"},
    ]


async def test_a_slow_postgres_refuses_each_claim_within_twice_the_store_timeout(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """DESIGN scenario 27: with every database round trip slower than `store.timeout` (1 s),
    20 requests at once each get RC 96 within twice that (a claim may wait that long for
    its write to begin, and the write that long again), nothing is forwarded, nothing
    stays in flight; once the database is quick again, requests are approved."""
    switch, app, port, chaos = await _store_behind_chaos(nursery, database, Mode.RELAY)
    assert app.store is not None
    with trio.fail_after(10):
        await app.store.wait_ready()
    chaos.latency = 3.0
    answers: list[tuple[str | None, float]] = []

    async def one(stan: int) -> None:
        terminal = await terminals.connect(port)
        started = trio.current_time()
        answer = await terminal.request(financial(stan, f"SLOWPG{stan:02d}"))
        answers.append((answer.get("39"), trio.current_time() - started))

    async with trio.open_nursery() as twenty:
        for stan in range(1, 21):
            twenty.start_soon(one, stan)
    assert [rc for rc, _ in answers] == ["96"] * 20
    assert max(took for _, took in answers) < 2 * 1.0 + 0.5  # twice store.timeout, and some
    assert switch.financial_total() == 0
    assert app.server.in_flight == 0

    chaos.latency = 0.0
    chaos.sever()  # what was held back behind the latency goes with the old connections
    terminal = await terminals.connect(port)
    with trio.fail_after(15):
        for stan in itertools.count(21):  # 96 until the store has reconnected
            await app.store.wait_ready()
            if (await terminal.request(financial(stan, "SLOWPG21"))).get("39") == "00":
                break
    assert switch.financial_total() == 1  # the 96s were never forwarded


async def test_a_duplicate_never_gets_the_answer_of_other_content_under_its_key(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch, _, port = await _journaled(nursery, database)
    terminal = await terminals.connect(port)
    moment = datetime.now(UTC)
    assert (await terminal.request(financial(6, amount=1000, when=moment))).get("39") == "00"
    # Two copies of another purchase under the same key (a terminal that reused its STAN):
    # the first is refused, and the second, joining it, must not get the first's approval.
    other = financial(6, amount=2000, when=moment)
    answers = await pipeline(terminal, [other, other])
    assert [(a.get("39"), a.get("4")) for a in answers] == [("94", "000000002000")] * 2
    assert switch.financial_total() == 1


async def test_a_request_that_never_left_may_be_sent_again(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch_port = await unused_port()
    app, port = await start_proxy(
        nursery, proxy_config({"alpha": switch_port}, store=database.store()), links_up=False
    )
    assert app.store is not None
    await app.store.wait_ready()
    terminal = await terminals.connect(port)
    advice = financial(12, mti="0220")
    assert (await terminal.request(advice)).get("39") == "91"  # no link: recorded as failed
    switch = await start_switch(nursery, port=switch_port)
    with trio.fail_after(10):
        await app.pool.wait_until(lambda: all(link.is_up for link in all_links(app)))
    repeat = await terminal.request(advice.with_fields({}, mti=Mti.parse("0221")))
    assert (repeat.mti.code, repeat.get("39")) == ("0230", "00")
    assert switch.financial_total() == 1
    rows = await database.fetch("SELECT mti, state, rc FROM transactions")
    assert rows == [{"mti": "0221", "state": "answered", "rc": "00"}]


async def test_nul_characters_are_stored_safely_and_fail_nobody_else(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch, _, port = await _journaled(nursery, database)
    terminal = await terminals.connect(port)
    odd = financial(13).with_fields({"42": "MERCHANT\x00000001"})
    answers = await pipeline(terminal, [odd, financial(14), financial(15)])
    assert sorted((a.get("11"), a.get("39")) for a in answers) == [
        ("000013", "00"),
        ("000014", "00"),
        ("000015", "00"),
    ]
    assert switch.financial_total() == 3
    rows = await database.fetch("SELECT request->>'42' AS merchant FROM transactions")
    assert {r["merchant"] for r in rows} == {"MERCHANT\ufffd000001", "MERCHANT0000001"}
