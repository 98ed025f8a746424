"""Timeouts, late answers and store-and-forward reversals, against a real Postgres."""

from __future__ import annotations

import itertools
import socket
import struct
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from codec import Message, Mti
from fixtures.messages import echo, financial
from fixtures.sim_switch import SimSwitch
from proxy.app import App
from proxy.reversals import ReversalWorker
from proxy.store import (
    DueReversal,
    Queued,
    ReplayHold,
    Store,
    StoreSettings,
    StoreUnavailable,
    Written,
)
from proxy.transactions import Claim, Outcome, TransactionIdentity, reversal_for
from tests.conftest import (
    TEST_PAN_KEY,
    Database,
    Terminals,
    metrics,
    proxy_config,
    start_proxy,
    start_switch,
    unused_port,
    wait_any,
)

QUICK_REVERSALS = {"backoff_initial": 0.05, "backoff_max": 0.4}


async def _proxy(
    nursery: trio.Nursery,
    database: Database,
    switch: SimSwitch,
    *,
    switch_timeout: float = 0.3,
    reversal: dict[str, Any] | None = None,
    **switch_settings: Any,
) -> tuple[App, int]:
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch.port},
            switch={"timeout": switch_timeout, **switch_settings},
            store=database.store(),
            reversal={**QUICK_REVERSALS, **(reversal or {})},
        ),
    )
    assert app.store is not None
    with trio.fail_after(10):
        await app.store.wait_ready()
    return app, port


async def test_a_late_approval_is_recorded_not_delivered_and_reversed_once(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch = await start_switch(nursery, delay=0.8)
    app, port = await _proxy(nursery, database, switch)
    terminal = await terminals.connect(port)
    started = trio.current_time()
    answer = await terminal.request(financial(21))
    elapsed = trio.current_time() - started
    assert (answer.mti.code, answer.get("39")) == ("0210", "91")
    assert 0.3 <= elapsed < 0.3 + 0.1  # at the deadline (within 100 ms)

    with trio.fail_after(10):
        await switch.wait_until(lambda: switch.received_reversals() >= 1)
        await app.forwarder.wait_late_recorded(1)
    reversal = next(r for r in switch.requests if r.mti.code == "0400")
    assert (reversal.get("90") or "").startswith("0200000021")  # names the original
    assert (reversal.get("11"), reversal.get("4")) == ("000021", "000000001000")
    assert "2" not in reversal.fields  # no card data kept to send
    rows = await database.fetch(
        "SELECT t.state, t.rc, t.late_rc, r.state AS reversal, r.mti FROM transactions t"
        " JOIN reversals r USING (tx_key)"
    )
    assert rows[0]["state"] == "timed_out" and rows[0]["rc"] == "91"
    assert rows[0]["late_rc"] == "00"  # the late approval, recorded
    assert (await metrics(app))[("isoproxy_late_responses_total", ())] == 1
    # Nothing reached the terminal after its 91: the next thing it gets is its echo's answer.
    reply = await terminal.request(echo(22))
    assert (reply.mti.code, reply.get("11")) == ("0810", "000022")
    assert app.reversals is not None
    with trio.fail_after(10):
        await app.reversals.wait_until(lambda: app.reversals.acknowledged >= 1)  # type: ignore[union-attr]
    assert (await database.fetch("SELECT state FROM reversals")) == [{"state": "acknowledged"}]
    assert switch.received_reversals() == 1


async def test_unanswered_reversals_are_repeated_with_backoff_until_acknowledged(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch = await start_switch(nursery, drop=True, ignore_reversals=3)
    app, port = await _proxy(
        nursery,
        database,
        switch,
        reversal={"max_attempts": 10, "backoff_initial": 0.2, "backoff_max": 5},
    )
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(31))).get("39") == "91"
    with trio.fail_after(15):
        await switch.wait_until(lambda: switch.received_reversals() >= 4)
    reversals = [r.mti.code for r in switch.requests if r.mti.message_class == 4]
    assert reversals == ["0400", "0401", "0401", "0401"]
    times = [
        t for r, t in zip(switch.requests, switch.arrivals, strict=True) if r.mti.message_class == 4
    ]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Each gap: the 0.3 s wait for an answer, then a backoff of 0.2, 0.4, 0.8 s (less
    # up to 20% jitter): they grow.
    assert gaps[0] < gaps[1] < gaps[2], gaps
    worker = app.reversals
    assert worker is not None
    with trio.fail_after(10):
        await worker.wait_until(lambda: worker.acknowledged >= 1)
    rows = await database.fetch("SELECT state, attempts, last_rc FROM reversals")
    assert rows == [{"state": "acknowledged", "attempts": 4, "last_rc": "00"}]
    with trio.move_on_after(1.0):  # a while later, nothing more was sent
        await switch.wait_until(lambda: switch.received_reversals() > 4)
    assert switch.received_reversals() == 4


async def test_a_reset_after_the_write_answers_at_once_and_queues_a_reversal(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    dying = await start_switch(nursery, close_after=2)  # its echo, then the request: reset
    _, port = await _proxy(nursery, database, dying, switch_timeout=10, connections=1)
    terminal = await terminals.connect(port)
    with trio.fail_after(3):  # not at the 10 s deadline
        assert (await terminal.request(financial(41))).get("39") == "91"
    assert [r.get("11") for r in dying.transactions()] == ["000041"]
    rows = await database.fetch("SELECT reason FROM reversals")
    assert rows == [{"reason": "timed_out"}]


async def test_an_approval_the_terminal_never_received_is_reversed(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch = await start_switch(nursery, delay=0.3)
    _, port = await _proxy(nursery, database, switch, switch_timeout=5)
    terminal = await terminals.connect(port)
    await terminal.send(financial(51))
    # Gone before the approval comes back (a reset, as when a terminal loses power).
    stream = terminal.stream
    assert isinstance(stream, trio.SocketStream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await terminal.aclose()
    with trio.fail_after(10):
        await switch.wait_until(lambda: switch.received_reversals() >= 1)
    rows = await database.fetch(
        "SELECT t.rc, r.reason FROM transactions t JOIN reversals r USING (tx_key)"
    )
    assert rows == [{"rc": "00", "reason": "undelivered"}]


WriteBatch = Callable[[Store, list[Claim | Outcome]], Awaitable[list[Written]]]


def _lost_after_commit(when: Callable[[list[Outcome]], bool]) -> WriteBatch:
    """The journal's writer, but a batch whose outcomes `when` picks is committed and
    then its connection is lost: its callers (claims gathered with those outcomes too)
    hear of an error, the database holds their writes."""
    write = Store._flush_writes

    async def committed_then_lost(store: Store, writes: list[Claim | Outcome]) -> list[Written]:
        written = await write(store, writes)
        outcomes = [w for w in writes if isinstance(w, Outcome)]
        if outcomes and when(outcomes):
            raise ConnectionResetError("connection lost after the commit")
        return written

    return committed_then_lost


async def test_an_approval_whose_outcome_write_failed_after_its_commit_is_reversed(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database committed the outcome, then the connection broke before its reply:
    the terminal gets RC 96, the journal says approved, and the claim is not open for
    recovery to find. The approval the terminal never got must still be reversed."""
    broken: list[list[Outcome]] = []

    def first_time(outcomes: list[Outcome]) -> bool:
        broken.append(outcomes)
        return len(broken) == 1

    monkeypatch.setattr(Store, "_flush_writes", _lost_after_commit(first_time))
    switch = await start_switch(nursery)
    _, port = await _proxy(nursery, database, switch, switch_timeout=5)
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(61))).get("39") == "96"
    with trio.fail_after(10):
        await switch.wait_until(lambda: switch.received_reversals() >= 1)
    rows = await database.fetch(
        "SELECT t.state, t.rc, r.reason FROM transactions t JOIN reversals r USING (tx_key)"
    )
    assert rows == [{"state": "answered", "rc": "00", "reason": "undelivered"}]


async def test_an_approval_whose_outcome_write_failed_before_its_commit_is_reversed_once(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESIGN scenario 28, the write that never landed: the terminal gets RC 96 and the
    claim stays open. The approval is reversed at once (undelivered), and recovery, which
    later closes the open claim, queues no second reversal."""
    write = Store._flush_writes
    failed: list[bool] = []

    async def lost_before_commit(store: Store, writes: list[Claim | Outcome]) -> list[Written]:
        if not failed and any(isinstance(w, Outcome) for w in writes):
            failed.append(True)
            raise ConnectionResetError("connection lost before the commit")
        return await write(store, writes)

    monkeypatch.setattr(Store, "_flush_writes", lost_before_commit)
    switch = await start_switch(nursery)
    config = proxy_config(
        {"alpha": switch.port},
        switch={"timeout": 0.3},
        store=database.store(timeout=0.5),
        reversal=QUICK_REVERSALS,
    )
    app, port = await start_proxy(nursery, config)
    assert app.store is not None
    with trio.fail_after(10):
        await app.store.wait_ready()
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(64))).get("39") == "96"
    assert (await database.fetch("SELECT state FROM transactions")) == [{"state": "claimed"}]
    assert app.orphan_age == 3.3  # timeout 0.3 + write grace 1 + 2 x 0.5 + 1
    reversals = app.reversals
    assert reversals is not None
    with trio.fail_after(2 * app.orphan_age + 5):  # recovery runs every orphan_age
        await switch.wait_until(lambda: switch.received_reversals() >= 1)
        await reversals.wait_until(lambda: reversals.recovered >= 1 and reversals.tried >= 1)
    assert (await database.fetch("SELECT state FROM transactions")) == [{"state": "timed_out"}]
    rows = await database.fetch("SELECT reason, state FROM reversals")
    assert rows == [{"reason": "undelivered", "state": "acknowledged"}]
    assert switch.received_reversals() == 1
    assert (await metrics(app))[("isoproxy_recovered_total", ())] == 1


async def test_a_terminal_is_read_again_while_its_96s_reversal_is_being_queued(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One request in flight per connection: once the terminal has its RC 96 (the outcome
    write failed after its commit), its next request is read and answered, although the
    approval's reversal is still being queued (store retries can take seconds)."""
    queue_reversal = Store.queue_reversal
    queuing, queue_may_finish = trio.Event(), trio.Event()

    def stan_63_until_queuing(outcomes: list[Outcome]) -> bool:
        return any("11=000063" in outcome.key for outcome in outcomes) and not queuing.is_set()

    async def slow_queue(store: Store, *args: Any) -> Queued:
        queuing.set()
        await queue_may_finish.wait()
        return await queue_reversal(store, *args)

    monkeypatch.setattr(Store, "_flush_writes", _lost_after_commit(stan_63_until_queuing))
    monkeypatch.setattr(Store, "queue_reversal", slow_queue)
    switch = await start_switch(nursery)
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch.port},
            listen={"max_inflight_per_connection": 1},
            store=database.store(),
            reversal=QUICK_REVERSALS,
        ),
    )
    assert app.store is not None
    with trio.fail_after(10):
        await app.store.wait_ready()
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(63))).get("39") == "96"
    with trio.fail_after(10):
        await queuing.wait()
        await app.store.wait_ready()  # reconnected after the lost connection
    with trio.fail_after(5):  # not held until the reversal is queued
        assert (await terminal.request(financial(64))).get("39") == "00"
    queue_may_finish.set()
    with trio.fail_after(10):
        await switch.wait_until(lambda: switch.received_reversals() >= 1)


async def test_a_stop_while_an_undelivered_approvals_reversal_waits_still_queues_it(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The approval's outcome was written, then its connection lost: the terminal got RC
    96. Queuing the reversal failed once and waits to be tried again when the proxy is
    stopped (a grace shorter than the retries): it is tried once more, not dropped, and
    the journal, stopped with the rest, stays open for that try."""
    queue_reversal, run_store = Store.queue_reversal, Store.run
    failed_once, store_stopped = trio.Event(), trio.Event()
    tries: list[str] = []

    async def blip_then_queue(store: Store, *args: Any) -> Queued:
        tries.append("try")
        if not failed_once.is_set():
            failed_once.set()
            raise StoreUnavailable("store not connected")
        with trio.move_on_after(1.0):  # a slow last try: the journal must wait for it
            await store_stopped.wait()
        return await queue_reversal(store, *args)

    async def run_until_stopped(store: Store, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await run_store(store, task_status=task_status)
        finally:
            store_stopped.set()

    monkeypatch.setattr(
        Store, "_flush_writes", _lost_after_commit(lambda _: not failed_once.is_set())
    )
    monkeypatch.setattr(Store, "queue_reversal", blip_then_queue)
    monkeypatch.setattr(Store, "run", run_until_stopped)
    switch = await start_switch(nursery)
    config = proxy_config({"alpha": switch.port}, store=database.store(), reversal=QUICK_REVERSALS)
    with trio.CancelScope() as proxy_scope:
        async with trio.open_nursery() as proxy:
            app, port = await start_proxy(proxy, config)
            assert app.store is not None
            with trio.fail_after(10):
                await app.store.wait_ready()
            terminal = await terminals.connect(port)
            assert (await terminal.request(financial(65))).get("39") == "96"
            with trio.fail_after(10):
                await failed_once.wait()
            await app.stop(0.1)  # the reversal's next try is 0.5 s away
            proxy_scope.cancel()
    assert tries == ["try", "try"]
    rows = await database.fetch(
        "SELECT t.state, t.rc, r.reason FROM transactions t JOIN reversals r USING (tx_key)"
    )
    assert rows == [{"state": "answered", "rc": "00", "reason": "undelivered"}]


async def _repeat_refused(terminals: Terminals, port: int, stan: int) -> None:
    """The terminal's repeat of `stan` (on a new connection) gets RC 96."""
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(stan, mti="0201"))).get("39") == "96"


async def _reversed_once(app: App, switch: SimSwitch) -> None:
    """Wait until a reversal is acknowledged: the switch got one, once."""
    reversals = app.reversals
    assert reversals is not None
    with trio.fail_after(10):
        await reversals.wait_until(lambda: reversals.acknowledged >= 1)
    assert switch.received_reversals() == 1


async def _approval_left_undelivered(
    nursery: trio.Nursery, terminals: Terminals, database: Database, stan: int
) -> tuple[App, SimSwitch, int]:
    """A proxy whose switch approved `stan` after its terminal had gone (a reset)."""
    switch = await start_switch(nursery, delay=0.3)
    app, port = await _proxy(nursery, database, switch, switch_timeout=5)
    terminal = await terminals.connect(port)
    await terminal.send(financial(stan))
    stream = terminal.stream
    assert isinstance(stream, trio.SocketStream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await terminal.aclose()
    return app, switch, port


async def test_a_repeat_while_its_approvals_reversal_is_retried_is_not_approved(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The original's approval found its terminal gone; queuing its reversal failed once
    (a store blip, which may yet have written it) and waits to be tried again. The
    terminal's repeat meanwhile is not given the approval: RC 96, and the reversal goes."""
    queue_reversal = Store.queue_reversal
    failed_once = trio.Event()

    async def blip_then_queue(store: Store, *args: Any) -> Queued:
        if not failed_once.is_set():
            failed_once.set()
            raise StoreUnavailable("store slower than 2 s")
        return await queue_reversal(store, *args)

    monkeypatch.setattr(Store, "queue_reversal", blip_then_queue)
    app, switch, port = await _approval_left_undelivered(nursery, terminals, database, 81)
    with trio.fail_after(10):
        await failed_once.wait()
    await _repeat_refused(terminals, port, 81)
    await _reversed_once(app, switch)


async def test_a_repeat_after_a_reversal_whose_reply_was_lost_is_not_approved(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Queuing the undelivered approval's reversal commits, but its reply is lost; the next
    try finds it queued. A repeat on that instance, which cannot read the journal, still
    gets RC 96: the instance keeps knowing that its reversal is queued."""
    queue_reversal = Store.queue_reversal
    results: list[Queued] = []
    refused = trio.Event()

    async def committed_then_lost(store: Store, *args: Any) -> Queued:
        results.append(await queue_reversal(store, *args))
        if len(results) == 1:
            raise StoreUnavailable("store error: ConnectionResetError")
        refused.set()
        return results[-1]

    async def unreadable(store: Store, key: str) -> ReplayHold | None:
        raise StoreUnavailable("store not connected")

    monkeypatch.setattr(Store, "queue_reversal", committed_then_lost)
    monkeypatch.setattr(Store, "hold_for_replay", unreadable)
    app, switch, port = await _approval_left_undelivered(nursery, terminals, database, 84)
    with trio.fail_after(10):
        await refused.wait()
    assert results == [Queued.NOW, Queued.ALREADY]
    await _repeat_refused(terminals, port, 84)
    await _reversed_once(app, switch)


async def test_a_repeat_whose_look_missed_its_reversal_being_queued_is_not_approved(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The repeat holds the approval's row (no reversal there yet) while the original's
    instance is about to queue one: on that same instance the reversal under way is still
    seen, and the hold is let go for it."""
    hold_for_replay, queue_reversal = Store.hold_for_replay, Store.queue_reversal
    queuing, looked = trio.Event(), trio.Event()

    async def look_before_it_lands(store: Store, key: str) -> ReplayHold | None:
        hold = await hold_for_replay(store, key)
        looked.set()
        return hold

    async def queue_after_the_look(store: Store, *args: Any) -> Queued:
        queuing.set()
        await looked.wait()
        return await queue_reversal(store, *args)

    monkeypatch.setattr(Store, "hold_for_replay", look_before_it_lands)
    monkeypatch.setattr(Store, "queue_reversal", queue_after_the_look)
    app, switch, port = await _approval_left_undelivered(nursery, terminals, database, 82)
    with trio.fail_after(10):
        await queuing.wait()  # the original is done with: the repeat looks in the journal
    await _repeat_refused(terminals, port, 82)
    await _reversed_once(app, switch)


async def test_a_repeat_of_an_approval_whose_reversal_is_queued_is_not_approved(
    nursery: trio.Nursery,
    terminals: Terminals,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The terminal repeats a purchase whose approval it never got, while the reversal
    waits to be sent: replaying the approval would leave the terminal approved and the
    cardholder refunded. The repeat gets RC 96, and the reversal still goes."""
    queued, released = trio.Event(), trio.Event()
    queue_reversal, lease_reversals = Store.queue_reversal, Store.lease_reversals

    async def queue_then_tell(store: Store, *args: Any) -> Queued:
        result = await queue_reversal(store, *args)
        queued.set()
        return result

    async def lease_once_released(store: Store, *args: Any) -> list[DueReversal]:
        await released.wait()
        return await lease_reversals(store, *args)

    monkeypatch.setattr(Store, "queue_reversal", queue_then_tell)
    monkeypatch.setattr(Store, "lease_reversals", lease_once_released)
    app, switch, port = await _approval_left_undelivered(nursery, terminals, database, 71)
    with trio.fail_after(10):
        await queued.wait()
    await _repeat_refused(terminals, port, 71)
    released.set()
    await _reversed_once(app, switch)


async def test_a_repeat_of_an_approval_already_reversed_is_not_approved(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    app, switch, port = await _approval_left_undelivered(nursery, terminals, database, 72)
    await _reversed_once(app, switch)
    await _repeat_refused(terminals, port, 72)
    rows = await database.fetch("SELECT state FROM reversals")
    assert rows == [{"state": "acknowledged"}]


async def test_two_instances_send_each_queued_reversal_once(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    switch = await start_switch(nursery, delay=0.5)
    first, first_port = await _proxy(nursery, database, switch)
    second, second_port = await _proxy(nursery, database, switch)
    async with trio.open_nursery() as senders:
        for n, port in enumerate([first_port, second_port] * 5):

            async def send(stan: int = 60 + n, port: int = port) -> None:
                terminal = await terminals.connect(port)
                assert (await terminal.request(financial(stan))).get("39") == "91"

            senders.start_soon(send)
    workers = [app.reversals for app in (first, second) if app.reversals is not None]

    def all_acknowledged() -> bool:
        return sum(worker.acknowledged for worker in workers) >= 10

    with trio.fail_after(15):  # whichever worker records the last one
        await wait_any(workers, all_acknowledged)
    stans = sorted(r.get("11") or "" for r in switch.requests if r.mti.message_class == 4)
    assert stans == [f"{60 + n:06d}" for n in range(10)]  # each sent once, by one of them
    rows = await database.fetch("SELECT state, attempts FROM reversals")
    assert rows == [{"state": "acknowledged", "attempts": 1}] * 10


async def test_a_terminals_reversal_goes_to_the_switch_that_handled_the_original(
    nursery: trio.Nursery, terminals: Terminals, database: Database
) -> None:
    alpha = await start_switch(nursery)
    beta = await start_switch(nursery)
    app, port = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": alpha.port, "beta": beta.port},
            switch={"connections": 1},
            store=database.store(),
        ),
    )
    assert app.store is not None
    await app.store.wait_ready()
    terminal = await terminals.connect(port)
    for stan in (81, 82, 83):  # round-robin: alpha, beta, alpha
        original = financial(stan)
        assert (await terminal.request(original)).get("39") == "00"
    assert [r.get("11") for r in alpha.transactions()] == ["000081", "000083"]
    # Reverse 000083 (alpha's): round-robin would pick beta next; it must go to alpha.
    original = alpha.transactions()[-1]
    reversal = original.with_fields(
        {"11": "000084", "90": "0200000083" + (original.get("7") or "") + "0" * 22},
        mti=Mti.parse("0400"),
    )
    assert (await terminal.request(reversal)).mti.code == "0410"
    assert [r.get("11") for r in alpha.requests if r.mti.message_class == 4] == ["000084"]
    assert not [r for r in beta.requests if r.get("11") == "000084"]
    # A reversal whose original is unknown takes the normal choice: some switch, once.
    stray = reversal.with_fields({"11": "000085", "90": "0200000099" + "0" * 32})
    assert (await terminal.request(stray)).mti.code == "0410"
    strays = [r for sw in (alpha, beta) for r in sw.requests if r.get("11") == "000085"]
    assert len(strays) == 1


def _queued_reversal() -> Message:
    original = financial(91)
    return reversal_for(dict(original.fields), "0200", "0400", datetime.now(UTC))


async def _queue(app: App, database: Database, reversal: Message) -> None:
    assert app.store is not None
    claim = TransactionIdentity(("41", "11"), TEST_PAN_KEY).claim(financial(91), datetime.now(UTC))
    assert await app.store.claim(claim) is None
    assert await app.store.queue_reversal(claim.key, "alpha", reversal, "timed_out") is Queued.NOW


async def test_a_reversal_waits_out_an_outage_without_spending_attempts(
    nursery: trio.Nursery, database: Database
) -> None:
    switch_port = await unused_port()
    app, _ = await start_proxy(
        nursery,
        proxy_config(
            {"alpha": switch_port},
            store=database.store(),
            reversal={**QUICK_REVERSALS, "max_attempts": 2},
        ),
        links_up=False,
    )
    assert app.store is not None and app.reversals is not None
    await app.store.wait_ready()
    await _queue(app, database, _queued_reversal())
    # Several tries while the switch is down: none counted.
    assert await _acknowledged_after_an_outage(nursery, app.reversals, switch_port, 4) == ["0400"]
    rows = await database.fetch("SELECT state, attempts FROM reversals")
    assert rows == [{"state": "acknowledged", "attempts": 1}]


async def _acknowledged_after_an_outage(
    nursery: trio.Nursery, worker: ReversalWorker, switch_port: int, tries: int
) -> list[str]:
    """Once `worker` has tried `tries` times with its switch down, the switch comes up on
    `switch_port`: the reversals it got, by MTI, once one was acknowledged."""
    with trio.fail_after(10):
        await worker.wait_until(lambda: worker.tried >= tries)
    switch = await start_switch(nursery, port=switch_port)
    with trio.fail_after(15):
        await worker.wait_until(lambda: worker.acknowledged >= 1)
    return [r.mti.code for r in switch.requests if r.mti.message_class == 4]


async def test_a_lapsed_reversal_whose_next_try_never_left_is_sent_as_a_repeat(
    nursery: trio.Nursery, database: Database
) -> None:
    """Another instance leased the reversal and its lease lapsed: it may have sent the
    0400. This instance's tries cannot leave (its switch is down); once they can, the
    switch gets a repeat (0401), never a second 0400."""
    gone = Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 16, 0.0, "gone"))
    await nursery.start(gone.run)
    await gone.wait_ready()
    claim = TransactionIdentity(("41", "11"), TEST_PAN_KEY).claim(financial(91), datetime.now(UTC))
    assert await gone.claim(claim) is None
    assert await gone.queue_reversal(claim.key, "alpha", _queued_reversal(), "timed_out") == (
        Queued.NOW
    )
    assert len(await gone.lease_reversals(1, 0.0)) == 1  # leased, and lapsed at once
    switch_port = await unused_port()
    app, _ = await start_proxy(
        nursery,
        proxy_config({"alpha": switch_port}, store=database.store(), reversal=QUICK_REVERSALS),
        links_up=False,
    )
    assert app.reversals is not None
    assert await _acknowledged_after_an_outage(nursery, app.reversals, switch_port, 3) == ["0401"]
    rows = await database.fetch("SELECT state, attempts FROM reversals")
    assert rows == [{"state": "acknowledged", "attempts": 2}]  # the lapsed holder's, and this


async def test_a_reversal_answered_without_processing_is_not_acknowledged(
    nursery: trio.Nursery, database: Database
) -> None:
    switch = await start_switch(nursery, rc="96")  # "system malfunction" to everything
    app, _ = await _proxy(nursery, database, switch, reversal={"max_attempts": 2})
    assert app.reversals is not None
    await _queue(app, database, _queued_reversal())
    worker = app.reversals
    with trio.fail_after(15):
        await worker.wait_until(lambda: worker.failed >= 1)
    assert [r.mti.code for r in switch.requests if r.mti.message_class == 4] == ["0400", "0401"]
    rows = await database.fetch("SELECT state, attempts, last_rc FROM reversals")
    assert rows == [{"state": "failed", "attempts": 2, "last_rc": "96"}]


async def test_a_reversal_for_a_switch_no_longer_configured_waits_and_says_why(
    nursery: trio.Nursery, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A queued reversal names a switch since removed from the config (recovery queued it
    for the switch its original went to): it is sent nowhere else, spends no attempt, is
    looked at again only every `backoff_max`, and each look's warning names the missing
    switch, not merely "no link"."""
    switch = await start_switch(nursery)
    app, _ = await _proxy(nursery, database, switch)
    assert app.store is not None and app.reversals is not None
    claim = TransactionIdentity(("41", "11"), TEST_PAN_KEY).claim(financial(92), datetime.now(UTC))
    assert await app.store.claim(claim) is None
    queued = await app.store.queue_reversal(claim.key, "gone", _queued_reversal(), "timed_out")
    assert queued is Queued.NOW
    worker = app.reversals
    with trio.fail_after(10):
        await worker.wait_until(lambda: worker.tried >= 2)
    assert "is for switch 'gone', which is not configured" in caplog.text
    rows = await database.fetch("SELECT state, attempts, switch FROM reversals")
    assert rows == [{"state": "queued", "attempts": 0, "switch": "gone"}]
    assert switch.received_reversals() == 0
