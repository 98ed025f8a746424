"""Two proxy instances, one database, two simulated switches (issue 9, acceptance 2).

The database decides who owns a transaction and shares the reversal queue: a duplicate
sent to the other instance is joined or replayed, never forwarded again; a reversal queued
by one instance is sent by one worker at a time, and an instance that dies mid-flight
leaves its claim to the other's recovery, which reverses it once.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from codec import Message, Mti
from fixtures.messages import echo, financial
from fixtures.sim_switch import SimSwitch
from fixtures.terminal import Terminal
from proxy import server as server_module
from proxy import streams
from proxy.app import App, Secrets
from proxy.config import Config
from proxy.decisions import Duplicate
from proxy.forwarder import Forwarder, Receipt
from proxy.reversals import ReversalWorker
from proxy.store import Queued, ReplayHold, Store, StoreUnavailable
from tests.conftest import (
    TEST_ADMIN_TOKEN,
    TEST_PAN_KEY,
    Database,
    Terminals,
    all_links,
    proxy_config,
    start_switch,
    until_waiting_for_a_lock,
    wait_any,
)

# Reversal workers look for due reversals every backoff_initial (0.05 s) and retry within
# backoff_max: a reversal sent twice (a broken lease, a lost acknowledgment) would show
# well within NOTHING_MORE.
QUICK_REVERSALS = {"backoff_initial": 0.05, "backoff_max": 0.4}
NOTHING_MORE = 1.0


class Instance:
    """One proxy instance: its app, its terminal port, and the scope that stops it."""

    def __init__(self, app: App, port: int, scope: trio.CancelScope) -> None:
        self.app = app
        self.port = port
        self.scope = scope

    @property
    def reversals(self) -> ReversalWorker:
        assert self.app.reversals is not None
        return self.app.reversals


async def start_instance(nursery: trio.Nursery, config: Config) -> Instance:
    """An instance like conftest's start_proxy (same PAN key), stoppable on its own; ready
    once its store is connected and every link is up."""
    app = App(config, Secrets(pan_key=TEST_PAN_KEY, admin_token=TEST_ADMIN_TOKEN))
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await app.run(task_status=task_status)

    port: int = await nursery.start(run)
    assert app.store is not None
    with trio.fail_after(10):
        await app.store.wait_ready()
        await app.pool.wait_until(lambda: all(link.is_up for link in all_links(app)))
    return Instance(app, port, scope)


def two_switch_config(
    database: Database, alpha: SimSwitch, beta: SimSwitch, **sections: Any
) -> Config:
    """Both switches, the journal in the test's schema (`store_timeout` when given)."""
    store_timeout = sections.pop("store_timeout", None)
    store = database.store() if store_timeout is None else database.store(timeout=store_timeout)
    return proxy_config({"alpha": alpha.port, "beta": beta.port}, store=store, **sections)


def forwarded(switches: Sequence[SimSwitch], *, mti_class: int = 2) -> Counter[tuple[str, str]]:
    """How often each (terminal, STAN) reached any switch in messages of `mti_class`."""
    return Counter(
        (r.get("41") or "", r.get("11") or "")
        for switch in switches
        for r in switch.requests
        if r.mti.message_class == mti_class
    )


def reversal_mtis(switch: SimSwitch, stan: str) -> list[str]:
    return [r.mti.code for r in switch.requests if r.mti.message_class == 4 and r.get("11") == stan]


def arrivals(switch: SimSwitch, stan: str) -> list[float]:
    """When `switch` received each reversal for `stan`."""
    return [
        at
        for r, at in zip(switch.requests, switch.arrivals, strict=True)
        if r.mti.message_class == 4 and r.get("11") == stan
    ]


async def ask(terminals: Terminals, port: int, request: Message) -> Message:
    terminal = await terminals.connect(port)
    return await terminal.request(request)


def summary(answer: Message) -> tuple[str, str | None, str | None, str | None]:
    return (answer.mti.code, answer.get("39"), answer.get("38"), answer.get("11"))


async def test_a_duplicate_sent_to_the_other_instance_is_forwarded_once(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """At once, while in flight, after the answer, and as a repeat (0201): one forward."""
    alpha = await start_switch(nursery, delay=0.3)
    beta = await start_switch(nursery, delay=0.3)
    switches = (alpha, beta)
    config = two_switch_config(database, alpha, beta)
    a = await start_instance(nursery, config)
    b = await start_instance(nursery, config)
    answers: dict[int, list[Message]] = {101: [], 102: [], 103: []}

    async def send(port: int, request: Message) -> None:
        answers[int(request.get("11") or "")].append(await ask(terminals, port, request))

    at_once, in_flight, after = (financial(stan) for stan in answers)
    async with trio.open_nursery() as senders:
        # 101: the same request to both instances at the same moment: either may win.
        senders.start_soon(send, a.port, at_once)
        senders.start_soon(send, b.port, at_once)
        # 102: to A; once a switch has it, the same again and its repeat to B (they join).
        senders.start_soon(send, a.port, in_flight)
        with trio.fail_after(5):
            await wait_any(switches, lambda: ("TERM0001", "000102") in forwarded(switches))
        senders.start_soon(send, b.port, in_flight)
        senders.start_soon(send, b.port, in_flight.with_fields({}, mti=Mti.parse("0201")))
    # 103: A answers it first; then B gets the same request and its repeat (replayed).
    await send(a.port, after)
    await send(b.port, after)
    await send(b.port, after.with_fields({}, mti=Mti.parse("0201")))

    assert forwarded(switches) == Counter({("TERM0001", f"{s:06d}"): 1 for s in answers})
    for stan, got in answers.items():
        expected = ("0210", "00", f"A{stan:05d}", f"{stan:06d}")
        assert [summary(answer) for answer in got] == [expected] * len(got)
    assert [len(got) for got in answers.values()] == [2, 3, 3]
    rows = await database.fetch(
        "SELECT stan, state, rc, auth_code, instance FROM transactions ORDER BY stan"
    )
    assert [(r["stan"], r["state"], r["rc"], r["auth_code"]) for r in rows] == [
        (f"{s:06d}", "answered", "00", f"A{s:05d}") for s in answers
    ]
    # 102 and 103 were A's; 101 whichever instance's claim landed first.
    assert [r["instance"] for r in rows[1:]] == [a.app.instance] * 2
    assert rows[0]["instance"] in (a.app.instance, b.app.instance)


async def test_fifty_transactions_over_two_instances_are_each_forwarded_once(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """50 transactions spread over both instances at once, 10 of them sent to both."""
    alpha = await start_switch(nursery, delay=0.05)
    beta = await start_switch(nursery, delay=0.05)
    switches = (alpha, beta)
    config = two_switch_config(database, alpha, beta)
    a = await start_instance(nursery, config)
    b = await start_instance(nursery, config)
    requests = [financial(200 + n, f"TERM{n % 5:04d}") for n in range(50)]
    answers: list[tuple[Message, Message]] = []

    async def send(port: int, request: Message) -> None:
        answers.append((request, await ask(terminals, port, request)))

    async with trio.open_nursery() as senders:
        for n, request in enumerate(requests):
            first, other = (a, b) if n % 2 == 0 else (b, a)
            senders.start_soon(send, first.port, request)
            if n % 5 == 0:  # a duplicate on the other instance, at the same time
                senders.start_soon(send, other.port, request)

    keys = {(r.get("41") or "", r.get("11") or "") for r in requests}
    assert forwarded(switches) == Counter(dict.fromkeys(keys, 1))
    assert alpha.transactions() and beta.transactions()  # both switches carried traffic
    assert len(answers) == 60
    for request, answer in answers:
        stan = request.get("11") or ""
        assert summary(answer) == ("0210", "00", f"A{stan[-5:]}", stan)
        assert answer.get("41") == request.get("41")
    rows = await database.fetch("SELECT terminal, stan, state, instance FROM transactions")
    assert sorted((r["terminal"], r["stan"]) for r in rows) == sorted(keys)
    assert {r["state"] for r in rows} == {"answered"}
    assert {r["instance"] for r in rows} == {a.app.instance, b.app.instance}


async def test_reversals_queued_by_one_instance_are_sent_once(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """Timeouts on A queue reversals; both instances' workers share the queue. Each switch
    leaves its first reversal unanswered, so it is in flight for a whole switch timeout
    (a window for the other worker to send it too, were the lease broken) and then
    repeated as 0401, possibly by the other instance."""
    silent = frozenset(f"{s:06d}" for s in range(301, 305))
    alpha = await start_switch(nursery, silent_stans=silent, ignore_reversals=1)
    beta = await start_switch(nursery, silent_stans=silent, ignore_reversals=1)
    switches = (alpha, beta)
    config = two_switch_config(
        database, alpha, beta, switch={"timeout": 0.5}, reversal=QUICK_REVERSALS
    )
    a = await start_instance(nursery, config)
    b = await start_instance(nursery, config)

    async def send(stan: str) -> None:
        answer = await ask(terminals, a.port, financial(stan))
        assert (answer.mti.code, answer.get("39")) == ("0210", "91")

    async with trio.open_nursery() as senders:
        for stan in silent:
            senders.start_soon(send, stan)
    workers = (a.reversals, b.reversals)

    def all_acknowledged() -> bool:
        return sum(worker.acknowledged for worker in workers) >= len(silent)

    with trio.fail_after(10):  # whichever worker records the last one
        await wait_any(workers, all_acknowledged)
    sent = sum(switch.received_reversals() for switch in switches)
    # Nothing should follow: a second sender would show within NOTHING_MORE (see above).
    with trio.move_on_after(NOTHING_MORE):
        await wait_any(switches, lambda: sum(s.received_reversals() for s in switches) > sent)

    rows = await database.fetch(
        "SELECT t.stan, t.state, t.rc, t.switch, t.instance, r.state AS reversal, r.attempts,"
        " r.last_rc, r.leased_by FROM transactions t JOIN reversals r USING (tx_key)"
        " ORDER BY t.stan"
    )
    assert [r["stan"] for r in rows] == sorted(silent)
    repeats = 0
    for row in rows:
        assert (row["state"], row["rc"], row["instance"]) == ("timed_out", "91", a.app.instance)
        assert (row["reversal"], row["last_rc"], row["leased_by"]) == ("acknowledged", "00", None)
        by_switch = {"alpha": alpha, "beta": beta}
        original = by_switch.pop(row["switch"])  # the reversal goes where the original went
        assert forwarded([original])[("TERM0001", row["stan"])] == 1
        assert [reversal_mtis(other, row["stan"]) for other in by_switch.values()] == [[]]
        mtis = reversal_mtis(original, row["stan"])
        assert mtis in (["0400"], ["0400", "0401"]), (row["stan"], mtis)
        assert row["attempts"] == len(mtis)
        if mtis == ["0400", "0401"]:  # repeated only once the first attempt had timed out
            first, repeat = arrivals(original, row["stan"])
            assert repeat - first >= 0.45, (row["stan"], repeat - first)
            repeats += 1
    # Each switch ignores its first reversal (at most one: two arriving together are both
    # answered), so at least one reversal spent a whole timeout in flight.
    assert 1 <= repeats <= len(switches)
    total = sum(s.received_reversals() for s in switches)
    assert total == len(silent) + repeats
    assert sum(worker.tried for worker in workers) == total  # each attempt recorded once
    assert forwarded(switches) == Counter({("TERM0001", s): 1 for s in silent})


async def test_a_stopped_instances_open_claim_is_reversed_once_by_the_other(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """A stops with a request written to a switch and unanswered: its claim stays open,
    and B's recovery closes it and reverses it, once."""
    alpha = await start_switch(nursery, silent_stans=frozenset({"000401"}))
    beta = await start_switch(nursery, silent_stans=frozenset({"000401"}))
    switches = (alpha, beta)
    # orphan_age = timeout 1 + write grace 1 + 2 x store timeout 0.5 + 1 = 4 s; the timeout
    # leaves A a second to be stopped before it would record the timeout itself.
    config = two_switch_config(
        database,
        alpha,
        beta,
        switch={"timeout": 1.0},
        store_timeout=0.5,
        reversal=QUICK_REVERSALS,
    )
    a = await start_instance(nursery, config)
    terminal = await terminals.connect(a.port)
    assert (await terminal.request(financial(400))).get("39") == "00"  # alpha's turn
    await terminal.send(financial(401))  # beta's
    with trio.fail_after(5):
        await wait_any(switches, lambda: ("TERM0001", "000401") in forwarded(switches))
    a.scope.cancel()  # A "dies": no outcome is written
    rows = await database.fetch(
        "SELECT state, instance, switch FROM transactions WHERE stan = '000401'"
    )
    assert rows == [{"state": "claimed", "instance": a.app.instance, "switch": "beta"}]

    # B starts after A's claim: its first sweep finds the claim too young, the next one
    # (orphan_age later) recovers it.
    b = await start_instance(nursery, config)
    assert b.app.orphan_age == 4.0
    with trio.fail_after(b.app.orphan_age + 5):
        await wait_any(switches, lambda: forwarded(switches, mti_class=4) != Counter())
        await b.reversals.wait_until(lambda: b.reversals.acknowledged >= 1)
    # Nothing should follow: another sweep or worker sending it again would show within
    # NOTHING_MORE (workers poll every 0.05 s).
    with trio.move_on_after(NOTHING_MORE):
        await wait_any(switches, lambda: sum(s.received_reversals() for s in switches) > 1)

    # Once, to the switch that got the original (the claim names it), though a fresh
    # instance's turn would have been alpha's.
    assert forwarded([beta], mti_class=4) == Counter({("TERM0001", "000401"): 1})
    assert forwarded([alpha], mti_class=4) == Counter()
    assert forwarded(switches) == Counter({("TERM0001", s): 1 for s in ("000400", "000401")})
    rows = await database.fetch(
        "SELECT t.state, t.rc, r.state AS reversal, r.reason, r.attempts, r.mti"
        " FROM transactions t JOIN reversals r USING (tx_key)"
    )
    assert rows == [
        {
            "state": "timed_out",
            "rc": "96",
            "reversal": "acknowledged",
            "reason": "recovered",
            "attempts": 1,
            "mti": "0400",
        }
    ]


async def test_journaled_requests_take_switches_and_links_in_turn(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """Choosing the switch for the claim takes the switch's turn; forwarding to it takes
    only its link's: each turn is taken once."""
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery)
    instance = await start_instance(nursery, two_switch_config(database, alpha, beta))
    terminal = await terminals.connect(instance.port)
    for stan in range(461, 467):
        assert (await terminal.request(financial(stan))).get("39") == "00"
    rows = await database.fetch("SELECT switch, link FROM transactions ORDER BY stan")
    assert [(r["switch"], r["link"]) for r in rows] == [
        ("alpha", "alpha/0"),
        ("beta", "beta/0"),
        ("alpha", "alpha/1"),
        ("beta", "beta/1"),
        ("alpha", "alpha/0"),
        ("beta", "beta/0"),
    ]


async def test_least_latency_spreads_a_burst_chosen_before_any_of_it_was_written(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """With the journal on, a burst's switches are all chosen before any of it is written
    (each waits for its claim); each choice counts as load, so the burst still spreads."""
    alpha = await start_switch(nursery, delay=0.05)
    beta = await start_switch(nursery, delay=0.05)
    config = two_switch_config(database, alpha, beta, routing={"strategy": "least_latency"})
    instance = await start_instance(nursery, config)
    connected = [await terminals.connect(instance.port) for _ in range(40)]
    async with trio.open_nursery() as burst:
        for n, terminal in enumerate(connected):
            burst.start_soon(terminal.request, financial(1000 + n, f"BURST{n:03d}"))
    rows = await database.fetch("SELECT switch, count(*) AS n FROM transactions GROUP BY switch")
    spread = {row["switch"]: row["n"] for row in rows}
    assert sum(spread.values()) == 40
    assert min(spread.get("alpha", 0), spread.get("beta", 0)) >= 10, spread


async def test_a_switch_drained_after_it_was_chosen_gets_nothing_new(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alpha is chosen for the claim, then drained while the claim is written: the
    request goes to beta, named in the claim first."""
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery)
    instance = await start_instance(nursery, two_switch_config(database, alpha, beta))
    claim = Store.claim

    async def drain_alpha_meanwhile(store: Store, *args: Any) -> Any:
        assert instance.app.act_on_switch("alpha", "drain")
        return await claim(store, *args)

    monkeypatch.setattr(Store, "claim", drain_alpha_meanwhile)
    terminal = await terminals.connect(instance.port)
    assert (await terminal.request(financial(454))).get("39") == "00"
    assert await database.fetch("SELECT switch FROM transactions") == [{"switch": "beta"}]
    assert forwarded([alpha]) == Counter()


async def test_a_request_its_switch_cannot_take_goes_to_the_next_named_first(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The claim names the switch chosen in turn; when that switch cannot carry the
    request (here its spec has no room for field 42), the claim is re-pointed at the next
    before anything is written there: while it is in flight, the journal names beta."""
    caplog.set_level(logging.INFO, logger="iso_proxy.transactions")
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text('base: default\nfields:\n  "42": {max_len: 10}\n')
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery, silent_stans=frozenset({"000451"}))
    config = two_switch_config(database, alpha, beta, each={"alpha": {"spec": str(narrow)}})
    instance = await start_instance(nursery, config)
    terminal = await terminals.connect(instance.port)
    await terminal.send(financial(451))
    with trio.fail_after(5):
        await wait_any((beta,), lambda: ("TERM0001", "000451") in forwarded([beta]))
    rows = await database.fetch("SELECT state, switch FROM transactions")
    assert rows == [{"state": "claimed", "switch": "beta"}]
    assert forwarded([alpha]) == Counter()
    assert "0200: alpha cannot take it; to beta" in caplog.text  # chosen first, then left


@pytest.mark.parametrize(
    "where",
    [
        "same instance",
        "other instance",
        "other instance, not noted yet",
    ],
)
async def test_an_approval_a_joined_repeat_delivered_is_not_reversed(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """The terminal's connection breaks while its purchase is at the (slow) switch; it
    reconnects and repeats, the repeat joins and gets the approval. The original's own
    answer then finds its connection gone: that is no reason to reverse what the terminal
    holds. Across instances, the repeat holds the approval's row until its delivery is
    noted there, and the original's instance, queuing its reversal meanwhile ("not noted
    yet"), waits for the row and then finds the note."""
    repeat_answered, replay_noted, queuing, queued = (trio.Event() for _ in range(4))
    queue_reversal, release_hold = Store.queue_reversal, Store.release_hold
    queue_results: list[Queued] = []

    async def queue_after_the_repeat(store: Store, *args: Any) -> Queued:
        await repeat_answered.wait()  # the repeat saw no reversal queued
        if where == "other instance":
            await replay_noted.wait()
        queuing.set()
        try:
            queue_results.append(await queue_reversal(store, *args))
            return queue_results[-1]
        finally:
            queued.set()

    async def release(store: Store, hold: ReplayHold, *, delivered: bool) -> None:
        if where == "other instance, not noted yet" and not replay_noted.is_set():
            await queuing.wait()  # the original's instance is queuing its reversal,
            await until_waiting_for_a_lock(database, "INSERT INTO reversals")  # for this row
        await release_hold(store, hold, delivered=delivered)
        if delivered:
            replay_noted.set()

    monkeypatch.setattr(Store, "queue_reversal", queue_after_the_repeat)
    monkeypatch.setattr(Store, "release_hold", release)
    first_instance, other, (alpha, beta) = await _slow_switches_and_instances(
        nursery, database, 0.5, where == "same instance"
    )
    request = financial(501)
    await _sent_then_reset(terminals, first_instance.port, request, (alpha, beta))
    again = request.with_fields({}, mti=Mti.parse("0201"))
    repeat = await ask(terminals, other.port, again)
    assert (repeat.mti.code, repeat.get("39")) == ("0210", "00")
    repeat_answered.set()
    if where != "same instance":  # the original's instance looked, and the note was there
        with trio.fail_after(10):
            await queued.wait()
        assert queue_results == [Queued.NOT_NEEDED]
    await trio.sleep(NOTHING_MORE)  # time enough for a reversal to be queued and sent
    assert await database.fetch("SELECT state, reason FROM reversals") == []
    assert alpha.received_reversals() + beta.received_reversals() == 0
    # Nothing is being reversed: a further repeat gets the approval, wherever it goes.
    for instance in (first_instance, other):
        assert (await ask(terminals, instance.port, again)).get("39") == "00"


async def test_a_replay_not_written_within_its_hold_is_let_go_and_the_original_reversed(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A repeat on the other instance holds the approval's row, but its terminal's earlier
    answer is still being written: by the hold's bound (half of store.timeout) the replay
    has not begun, so it is not written at all, and the hold is let go. The original's
    instance, which was queuing its reversal meanwhile, waited for the row and queues it:
    nobody got the approval."""
    held, released = trio.Event(), trio.Event()
    hold_for_replay, queue_reversal = Store.hold_for_replay, Store.queue_reversal
    send_whole = streams.send_whole
    queue_results: list[Queued | str] = []

    async def hold_then_tell(store: Store, key: str) -> ReplayHold | None:
        hold = await hold_for_replay(store, key)
        held.set()
        return hold

    async def queue_once_held(store: Store, *args: Any) -> Queued:
        await held.wait()
        try:
            queued = await queue_reversal(store, *args)
        except StoreUnavailable as error:  # a try cut short waiting for the row: too long
            queue_results.append(str(error))
            raise
        queue_results.append(queued)
        return queued

    async def echo_answer_stuck(stream: trio.abc.Stream, data: bytes, deadline: float) -> bool:
        if b"0810" in data and not released.is_set():
            await released.wait()  # the connection's write lock is held meanwhile
        return await send_whole(stream, data, deadline)

    monkeypatch.setattr(Store, "hold_for_replay", hold_then_tell)
    monkeypatch.setattr(Store, "queue_reversal", queue_once_held)
    monkeypatch.setattr(server_module, "send_whole", echo_answer_stuck)
    first_instance, other, switches = await _slow_switches_and_instances(
        nursery, database, 0.5, False
    )
    request = financial(521)
    await _sent_then_reset(terminals, first_instance.port, request, switches)
    repeating = await terminals.connect(other.port)
    await repeating.send(echo(522))  # its answer will hold the connection's writes
    await repeating.send(request.with_fields({}, mti=Mti.parse("0201")))
    with trio.fail_after(10):
        await wait_any(switches, lambda: sum(s.received_reversals() for s in switches) > 0)
    assert queue_results == [Queued.NOW]  # one try: it waited for the row, within its time
    released.set()
    assert (await repeating.receive()).mti.code == "0810"
    rows = await database.fetch("SELECT replayed_at IS NULL AS unnoted FROM transactions")
    assert rows == [{"unnoted": True}]
    assert await database.fetch("SELECT reason FROM reversals") == [{"reason": "undelivered"}]
    with trio.move_on_after(0.2):  # nothing follows the echo's answer: the replay never left
        assert await repeating.receive_frame() is None


async def test_a_repeat_that_joined_another_repeat_notes_the_approval_it_got(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The original's answer finds its connection gone; its first repeat, on the other
    instance, waits there for the journal's answer and loses its connection too; a second
    repeat joins the first on that instance and gets the approval. That delivery is noted
    in the journal, and the original's instance does not reverse it."""
    polling, noted, queued = trio.Event(), trio.Event(), trio.Event()
    recorded, queue_reversal, release_hold = (
        Store.recorded,
        Store.queue_reversal,
        Store.release_hold,
    )
    queue_results: list[Queued] = []

    async def look(store: Store, key: str) -> Any:
        polling.set()  # the first repeat waits for the journal's answer
        return await recorded(store, key)

    async def queue_after_the_note(store: Store, *args: Any) -> Queued:
        await noted.wait()
        queue_results.append(await queue_reversal(store, *args))
        queued.set()
        return queue_results[-1]

    async def release(store: Store, hold: ReplayHold, *, delivered: bool) -> None:
        await release_hold(store, hold, delivered=delivered)
        if delivered:
            noted.set()

    monkeypatch.setattr(Store, "recorded", look)
    monkeypatch.setattr(Store, "queue_reversal", queue_after_the_note)
    monkeypatch.setattr(Store, "release_hold", release)
    first_instance, other, switches = await _slow_switches_and_instances(
        nursery, database, 1.0, False
    )
    request = financial(511)
    again = request.with_fields({}, mti=Mti.parse("0201"))
    await _sent_then_reset(terminals, first_instance.port, request, switches)
    first_repeat = await terminals.connect(other.port)
    await first_repeat.send(again)
    with trio.fail_after(5):
        await polling.wait()
    await _reset(first_repeat)
    assert (await ask(terminals, other.port, again)).get("39") == "00"
    assert other.app.forwarder.duplicates[Duplicate.JOIN] == 2  # the second joined the first
    with trio.fail_after(5):
        await noted.wait()
        await queued.wait()
    assert queue_results == [Queued.NOT_NEEDED]
    rows = await database.fetch("SELECT replayed_at IS NOT NULL AS noted FROM transactions")
    assert rows == [{"noted": True}]
    assert await database.fetch("SELECT state FROM reversals") == []


@pytest.mark.parametrize("where", ["same instance", "other instance"])
async def test_other_content_given_an_approval_does_not_stop_its_reversal(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """With `on_conflict: replay`, other content under the key of an approval whose
    terminal never got it is given that approval. That is no delivery of the original
    (the terminal did not ask for that purchase): it is reversed all the same."""
    undelivered, delivered = Forwarder.undelivered, Forwarder.delivered
    original_settling, other_content_delivered = trio.Event(), trio.Event()

    async def after_the_other_content(self: Forwarder, receipt: Receipt) -> None:
        original_settling.set()
        await other_content_delivered.wait()
        await undelivered(self, receipt)

    async def then_tell(self: Forwarder, receipt: Receipt) -> None:
        await delivered(self, receipt)
        if not receipt.original:
            other_content_delivered.set()

    monkeypatch.setattr(Forwarder, "undelivered", after_the_other_content)
    monkeypatch.setattr(Forwarder, "delivered", then_tell)
    first_instance, other, (alpha, beta) = await _slow_switches_and_instances(
        nursery, database, 0.5, where == "same instance", idempotency={"on_conflict": "replay"}
    )
    request = financial(521)
    await _sent_then_reset(terminals, first_instance.port, request, (alpha, beta))
    with trio.fail_after(5):
        await original_settling.wait()  # recorded, its write failed: not yet reversed
    other_content = request.with_fields({"4": "000000009999"})
    assert (await ask(terminals, other.port, other_content)).get("39") == "00"
    with trio.fail_after(10):
        await wait_any(
            (alpha, beta), lambda: alpha.received_reversals() + beta.received_reversals() > 0
        )
    rows = await database.fetch("SELECT replayed_at IS NULL AS unnoted FROM transactions")
    assert rows == [{"unnoted": True}]
    assert await database.fetch("SELECT reason FROM reversals") == [{"reason": "undelivered"}]


async def _slow_switches_and_instances(
    nursery: trio.Nursery, database: Database, delay: float, shared: bool, **sections: Any
) -> tuple[Instance, Instance, tuple[SimSwitch, SimSwitch]]:
    """Two switches answering `delay` s late, and an instance for the original and one for
    its repeats (the same one when `shared`), with quick reversals and `sections`."""
    alpha = await start_switch(nursery, delay=delay)
    beta = await start_switch(nursery, delay=delay)
    config = two_switch_config(database, alpha, beta, reversal=QUICK_REVERSALS, **sections)
    first = await start_instance(nursery, config)
    other = first if shared else await start_instance(nursery, config)
    return first, other, (alpha, beta)


async def _sent_then_reset(
    terminals: Terminals, port: int, request: Message, switches: Sequence[SimSwitch]
) -> None:
    """`request` from a terminal that resets its connection once a switch has it: the
    answer will find nobody to take it."""
    terminal = await terminals.connect(port)
    await terminal.send(request)
    with trio.fail_after(5):
        await wait_any(switches, lambda: sum(s.financial_total() for s in switches) > 0)
    await _reset(terminal)


async def _reset(terminal: Terminal) -> None:
    """Close `terminal`'s connection with a reset: what the proxy writes to it then fails."""
    stream = terminal.stream
    assert isinstance(stream, trio.SocketStream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await terminal.aclose()


async def test_an_approval_a_repeat_was_given_stays_so_after_a_later_94(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The original's approval is stuck on its way (the terminal is not reading); its
    repeat is given the approval from the journal, then the same key with other content
    gets RC 94. The original's write then fails: a terminal holds the approval, so it is
    not reversed (the 94 given since does not hide it)."""
    stuck, release = trio.Event(), trio.Event()
    write = server_module._Connection._write

    async def first_approval_stuck(
        self: Any, data: bytes, message: Message, by: float | None = None
    ) -> bool:
        if message.get("11") == "000091" and message.get("39") == "00" and not stuck.is_set():
            stuck.set()
            await release.wait()  # then its write fails (as at the write deadline)
            return False
        return await write(self, data, message, by)

    monkeypatch.setattr(server_module._Connection, "_write", first_approval_stuck)
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery)
    config = two_switch_config(database, alpha, beta, reversal=QUICK_REVERSALS)
    instance = await start_instance(nursery, config)
    request = financial(91)
    first = await terminals.connect(instance.port)
    await first.send(request)
    with trio.fail_after(5):
        await stuck.wait()
    repeat = await ask(terminals, instance.port, request.with_fields({}, mti=Mti.parse("0201")))
    assert repeat.get("39") == "00"
    other = await ask(terminals, instance.port, request.with_fields({"4": "000000009999"}))
    assert other.get("39") == "94"
    release.set()
    assert await instance.app.server.drain(10)  # the original's settling is over
    assert await database.fetch("SELECT reason FROM reversals") == []
    assert alpha.received_reversals() + beta.received_reversals() == 0


async def test_a_refused_duplicate_does_not_count_as_delivering_the_approval(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    """Same key, other content, while the original is at the switch: RC 94 is written to
    that terminal. The original's approval then finds its connection gone: the terminal
    that asked never got it, so it is reversed."""
    alpha = await start_switch(nursery, delay=0.5)
    beta = await start_switch(nursery, delay=0.5)
    config = two_switch_config(database, alpha, beta, reversal=QUICK_REVERSALS)
    instance = await start_instance(nursery, config)
    request = financial(601)
    first = await terminals.connect(instance.port)
    await first.send(request)
    with trio.fail_after(5):
        await wait_any((alpha, beta), lambda: alpha.financial_total() + beta.financial_total() > 0)
    other_content = request.with_fields({"4": "000000009999"})
    assert (await ask(terminals, instance.port, other_content)).get("39") == "94"
    await _reset(first)
    with trio.fail_after(10):
        await wait_any(
            (alpha, beta), lambda: alpha.received_reversals() + beta.received_reversals() > 0
        )
    rows = await database.fetch("SELECT reason FROM reversals")
    assert rows == [{"reason": "undelivered"}]
