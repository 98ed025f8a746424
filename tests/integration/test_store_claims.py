"""The journal's batched writes: claims and outcomes gathered together go in one statement,
and stand or fail together only by what the database did with them (a repeat in the same
batch, whose row the store must then look up, cannot take its neighbours down with it when
that lookup fails); and the connection the writer keeps between writes never holds up the
store's closing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial

import asyncpg
import pytest
import trio

import proxy.store
from fixtures.messages import financial
from proxy.responses import answer
from proxy.store import (
    Queued,
    Store,
    StoreSettings,
    StoreUnavailable,
    _migrate,
    journal_statement,
    session_settings,
)
from proxy.transactions import Claim, Recorded, TransactionIdentity, outcome_of, reversal_for
from tests.conftest import Database, until_waiting_for_a_lock

IDENTITY = TransactionIdentity(("32", "41", "11", "37", "7"), b"claims-test-key")


async def test_a_repeat_whose_lookup_fails_leaves_the_claim_beside_it_won(
    nursery: trio.Nursery, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two at a time, gathered for up to a second: both claims below go in one batch.
    settings = StoreSettings(database.dsn, database.schema, 5.0, 2, 2, 1.0, "claims-test")
    store = Store(settings)
    await nursery.start(store.run)
    await store.wait_ready()
    now = datetime.now(UTC)
    repeat = IDENTITY.claim(financial(1, "CLAIMS01", when=now), now)
    fresh = IDENTITY.claim(financial(2, "CLAIMS01", when=now), now)
    assert await store.claim(repeat) is None  # claimed once: the next is a repeat
    # The repeat's row cannot be read (as if the connection broke just then).
    monkeypatch.setattr(proxy.store, "_SELECT_RECORDED", "SELECT broken(")
    results: dict[str, object] = {}

    async def claim(name: str, claim: Claim) -> None:
        try:
            results[name] = await store.claim(claim)
        except StoreUnavailable as error:
            results[name] = error

    async with trio.open_nursery() as both:
        both.start_soon(claim, "repeat", repeat)
        both.start_soon(claim, "fresh", fresh)
    assert isinstance(results["repeat"], StoreUnavailable)
    assert results["fresh"] is None  # its row is written: it is this caller's to forward
    rows = await database.fetch("SELECT stan, state FROM transactions ORDER BY stan")
    assert rows == [{"stan": "000001", "state": "claimed"}, {"stan": "000002", "state": "claimed"}]


async def test_the_store_closes_promptly_with_its_writers_connection_kept(
    database: Database,
) -> None:
    """The writer keeps a pool connection between writes; closing the pool waits for
    every connection to come back (5 s at most), so the store gives them back first."""
    store = Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 16, 0.0, "claims-test"))
    now = datetime.now(UTC)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.wait_ready()
        claim = IDENTITY.claim(financial(3, "CLAIMS02", when=now), now)
        assert await store.claim(claim) is None
        started = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started < 3  # not the pool's 5 s wait for its connections


async def test_a_kept_connection_unused_for_a_while_goes_back_to_the_pool(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else a connection a firewall dropped silently overnight would be the morning's first
    write's, and cost it the store's timeout; in the pool it is closed when idle long."""
    monkeypatch.setattr(proxy.store, "LEASE_IDLE", 0.2)
    store = Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 16, 0.0, "claims-test"))
    now = datetime.now(UTC)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.wait_ready()
        pool = store._pool
        assert pool is not None
        assert await store.claim(IDENTITY.claim(financial(4, "CLAIMS03", when=now), now)) is None
        assert pool.get_idle_size() < pool.get_size()  # kept by the journal's writer
        with trio.fail_after(5):  # the lease's own timer, on the store's loop
            while True:
                if pool.get_idle_size() == pool.get_size():
                    break
                await trio.sleep(0.05)
        assert await store.claim(IDENTITY.claim(financial(5, "CLAIMS03", when=now), now)) is None
        nursery.cancel_scope.cancel()


async def test_a_lapsed_holders_late_result_does_not_undo_the_next_holders(
    database: Database,
) -> None:
    """Instance one's lease on a reversal lapses (its switch, or the store, was slow);
    instance two sends it and gives up on it. One's result, coming after, must not put the
    reversal back in the queue to be sent again."""
    one, two = (
        Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 16, 0.0, name))
        for name in ("instance-one", "instance-two")
    )
    now = datetime.now(UTC)
    async with trio.open_nursery() as nursery:
        for store in (one, two):
            await nursery.start(store.run)
            await store.wait_ready()
        claim = IDENTITY.claim(financial(7, "CLAIMS05", when=now), now)
        assert await one.claim(claim) is None
        reversal = reversal_for({"11": "000007"}, "0200", "0400", now)
        assert await one.queue_reversal(claim.key, "alpha", reversal, "timed_out") is Queued.NOW
        [held] = await one.lease_reversals(1, 0.0)  # a lease that has lapsed at once
        [taken] = await two.lease_reversals(1, 30.0)
        assert (taken.id, taken.lapsed) == (held.id, True)
        assert await two.reversal_sent(taken.id, "failed", "91", 0.0, written=True)
        assert not await one.reversal_sent(held.id, "queued", "91", 0.0, written=True)
        nursery.cancel_scope.cancel()
    rows = await database.fetch("SELECT state, attempts FROM reversals")
    assert rows == [{"state": "failed", "attempts": 2}]  # one's (it may have sent it), two's


async def test_claims_and_outcomes_gathered_together_commit_as_one_write(
    database: Database,
) -> None:
    """A fresh claim, a repeat's, an approval's outcome and a timeout's (with its reversal)
    queued together go in one statement: one commit (the rows share the transaction that
    wrote them), and each caller gets its own answer."""
    now = datetime.now(UTC)
    answered, timed_out, repeated, fresh = (
        (request, IDENTITY.claim(request, now))
        for request in (financial(n, "CLAIMS06", when=now) for n in range(8, 12))
    )
    gathering = StoreSettings(database.dsn, database.schema, 5.0, 8, 4, 2.0, "claims-test")
    async with trio.open_nursery() as nursery:
        setup = Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 16, 0.0, "setup"))
        await nursery.start(setup.run)
        await setup.wait_ready()
        for _, claim in (answered, timed_out, repeated):
            assert await setup.claim(claim) is None
        store = Store(gathering)  # writes once four are queued
        await nursery.start(store.run)
        await store.wait_ready()
        reversal = reversal_for(timed_out[1].fields, "0200", "0400", now)
        results: dict[str, object] = {}

        async def run(name: str, work: Awaitable[object]) -> None:
            results[name] = await work

        async with trio.open_nursery() as four:
            four.start_soon(run, "fresh", store.claim(fresh[1]))
            four.start_soon(run, "repeated", store.claim(repeated[1]))
            approval = outcome_of(answered[1], answer(answered[0], "00"), state="answered")
            four.start_soon(run, "answered", store.complete(approval))
            timeout = outcome_of(
                timed_out[1], answer(timed_out[0], "91"), state="timed_out", reversal=reversal
            )
            four.start_soon(run, "timed_out", store.complete(timeout))
        nursery.cancel_scope.cancel()
    assert results["fresh"] is None  # won: the caller's to forward
    assert isinstance(results["repeated"], Recorded) and results["repeated"].state == "claimed"
    assert (results["answered"], results["timed_out"]) == (True, True)
    rows = await database.fetch(
        "SELECT stan, state, rc, xmin::text AS written_by FROM transactions ORDER BY stan"
    )
    assert [(r["stan"], r["state"], r["rc"]) for r in rows] == [
        ("000008", "answered", "00"),
        ("000009", "timed_out", "91"),
        ("000010", "claimed", None),
        ("000011", "claimed", None),
    ]
    by_stan = {r["stan"]: r["written_by"] for r in rows}
    assert by_stan["000008"] == by_stan["000009"] == by_stan["000011"] != by_stan["000010"]
    reversals = await database.fetch("SELECT tx_key, state, reason FROM reversals")
    assert reversals == [{"tx_key": timed_out[1].key, "state": "queued", "reason": "timed_out"}]


async def test_another_instance_claiming_the_same_keys_does_not_fail_the_outcome_beside_them(
    nursery: trio.Nursery, database: Database
) -> None:
    """Another instance's batch holds one of two keys this batch claims (a terminal's repeat
    reached both) and then claims the other. Inserted in whatever order they came, the two
    statements would wait for each other in a circle and PostgreSQL would abort one: here,
    with the approval's outcome written beside the claims. Both insert in key order."""
    now = datetime.now(UTC)
    approved = financial(12, "CLAIMS07", when=now)
    answered = IDENTITY.claim(approved, now)
    low, high = sorted(
        (IDENTITY.claim(financial(n, "CLAIMS07", when=now), now) for n in (13, 14)),
        key=lambda claim: claim.key,
    )
    setup = Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 16, 0.0, "setup"))
    await nursery.start(setup.run)
    await setup.wait_ready()
    assert await setup.claim(answered) is None
    holding, go = threading.Event(), threading.Event()
    nursery.start_soon(
        trio.to_thread.run_sync, partial(_other_instance, database, low, high, holding, go)
    )
    # The other instance holds `low` (its thread gives up on its own after 10 s).
    assert await trio.to_thread.run_sync(holding.wait, 10)
    store = Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 3, 2.0, "claims-test"))
    await nursery.start(store.run)
    await store.wait_ready()
    results: dict[str, object] = {}

    async def write(
        name: str, work: Callable[[], Awaitable[object]], *, task_status: trio.TaskStatus[None]
    ) -> None:
        task_status.started()  # runs on to its write being queued: the batch's order
        try:
            results[name] = await work()
        except StoreUnavailable as error:
            results[name] = error

    try:
        async with trio.open_nursery() as three:  # gathered once all three are queued
            await three.start(write, "high", partial(store.claim, high))
            await three.start(write, "low", partial(store.claim, low))
            outcome = outcome_of(answered, answer(approved, "00"), state="answered")
            await three.start(write, "outcome", partial(store.complete, outcome))
            with trio.fail_after(10):  # this batch waits for the other instance's `low`
                while True:
                    if await database.fetch(
                        "SELECT 1 FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    ):
                        break
                    await trio.sleep(0.02)  # nothing to wait on but PostgreSQL's own view
            go.set()  # the other instance claims `high` and commits
    finally:
        go.set()  # never a thread left waiting
    assert results["outcome"] is True, results
    assert isinstance(results["low"], Recorded) and isinstance(results["high"], Recorded)


def _other_instance(
    database: Database, low: Claim, high: Claim, holding: threading.Event, go: threading.Event
) -> None:
    """Another instance's claims of `low` then `high`, in one transaction paused between."""

    async def claim_both() -> None:
        connection = await asyncpg.connect(
            database.dsn, server_settings={"search_path": database.schema}
        )
        try:
            async with connection.transaction():
                for claim in (low, high):
                    sql, args = journal_statement([claim], [], "other-instance")
                    await connection.fetch(sql, *args)
                    if claim is low:
                        holding.set()
                        await asyncio.get_running_loop().run_in_executor(None, go.wait, 10)
        finally:
            await connection.close()

    asyncio.run(claim_both())


async def test_a_migration_gives_up_on_a_table_another_session_holds(
    database: Database,
) -> None:
    """A migration that alters `transactions` while a long report reads it would wait, and
    every other instance's journal writes would queue behind its lock request: it gives up
    within its lock timeout instead (start-up tries again later)."""

    async def migrate_while_a_report_reads() -> str:
        settings = session_settings(database.schema)
        report = await asyncpg.connect(database.dsn, server_settings=settings)
        # Without a lock timeout it would wait for the report for ever: cut at 5 s here.
        migrator = await asyncpg.connect(
            database.dsn, server_settings={**settings, "statement_timeout": "5000"}
        )
        try:
            await _migrate(migrator, database.schema)
            await migrator.execute(
                "ALTER TABLE transactions DROP COLUMN replayed_at;"
                " DELETE FROM schema_migrations WHERE version = '003_replayed'"
            )
            async with report.transaction():
                await report.fetch("SELECT count(*) FROM transactions")  # holds its lock
                try:
                    await _migrate(migrator, database.schema)
                except asyncpg.PostgresError as error:
                    return type(error).__name__
                return "migrated"
        finally:
            await report.close()
            await migrator.close()

    outcome = await trio.to_thread.run_sync(asyncio.run, migrate_while_a_report_reads())
    assert outcome == "LockNotAvailableError"  # not QueryCanceledError, 5 s later


async def test_only_an_answered_row_is_noted_as_replayed_and_a_reclaim_clears_the_note(
    database: Database,
) -> None:
    """The replay note says a repeat holds the row's answer (so no reversal is queued for
    the original). A row that failed holds no answer to give: it takes no note; and a row
    claimed again starts a new attempt, so a note left from before must go."""
    now = datetime.now(UTC)
    request = financial(13, "CLAIMS07", when=now)
    claim = IDENTITY.claim(request, now)
    async with trio.open_nursery() as nursery:
        store = Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 16, 0.0, "replays"))
        await nursery.start(store.run)
        await store.wait_ready()
        assert await store.claim(claim) is None
        failed = outcome_of(claim, answer(request, "96"), state="failed")
        assert await store.complete(failed)
        await store.mark_replayed(claim.key)
        [row] = await database.fetch("SELECT replayed_at IS NULL AS unnoted FROM transactions")
        assert row == {"unnoted": True}
        await database.fetch("UPDATE transactions SET replayed_at = now()")  # an old note
        assert await store.claim(claim) is None  # reclaimed: it never left
        nursery.cancel_scope.cancel()
    rows = await database.fetch("SELECT state, replayed_at IS NULL AS unnoted FROM transactions")
    assert rows == [{"state": "claimed", "unnoted": True}]


@pytest.mark.parametrize("delivered", [True, False])
async def test_a_reversal_queued_while_a_repeat_holds_the_row_waits_for_its_delivery(
    database: Database, delivered: bool
) -> None:
    """One instance holds an approval's row while its repeat is given the approval; the
    other, queuing the original's reversal meanwhile, waits. Delivered: the replay is
    noted and no reversal is queued. Not delivered: the reversal is queued. Once a
    reversal is queued, the row is no longer held for a replay."""
    now = datetime.now(UTC)
    request = financial(14, "CLAIMS08", when=now)
    claim = IDENTITY.claim(request, now)
    reversal = reversal_for(claim.fields, "0200", "0400", now)
    repeats, original = (
        Store(StoreSettings(database.dsn, database.schema, 5.0, 8, 16, 0.0, name))
        for name in ("repeat-instance", "original-instance")
    )
    results: list[Queued] = []
    queued = trio.Event()
    async with trio.open_nursery() as nursery:
        for store in (repeats, original):
            await nursery.start(store.run)
            await store.wait_ready()
        assert await original.claim(claim) is None
        assert await original.complete(outcome_of(claim, answer(request, "00"), state="answered"))
        hold = await repeats.hold_for_replay(claim.key)
        assert hold is not None

        async def queue() -> None:
            results.append(await original.queue_reversal(claim.key, "alpha", reversal, "why"))
            queued.set()

        nursery.start_soon(queue)
        await until_waiting_for_a_lock(database, "INSERT INTO reversals")
        assert results == []  # it waits for the hold
        await repeats.release_hold(hold, delivered=delivered)
        with trio.fail_after(5):
            await queued.wait()
        assert results == [Queued.NOT_NEEDED if delivered else Queued.NOW]
        again = await repeats.hold_for_replay(claim.key)
        assert (again is None) is not delivered  # refused once a reversal is queued
        if again is not None:
            await repeats.release_hold(again, delivered=False)
        nursery.cancel_scope.cancel()
    rows = await database.fetch("SELECT replayed_at IS NOT NULL AS noted FROM transactions")
    assert rows == [{"noted": delivered}]
    assert len(await database.fetch("SELECT 1 FROM reversals")) == (0 if delivered else 1)


# What another session keeps locked: the approval's row (an instance queuing its reversal,
# stuck), or the whole reversals table (a migration, a VACUUM FULL).
LOCKS = {
    "row": "SELECT 1 FROM transactions WHERE tx_key = $1 FOR UPDATE",
    "reversals": "LOCK TABLE reversals IN ACCESS EXCLUSIVE MODE",
}


@pytest.mark.parametrize("locked", LOCKS)
async def test_a_repeat_does_not_wait_out_a_row_another_session_keeps_locked(
    nursery: trio.Nursery, database: Database, locked: str
) -> None:
    """Another session keeps an approval's row, or the reversals table, locked: a repeat's
    hold gives up at REPLAY_LOCK_SHARE of store.timeout and the approval is refused (None),
    not given again unchecked (StoreUnavailable, once store.timeout has passed); the store
    stays ready, and holds the row again once it is free."""
    now = datetime.now(UTC)
    request = financial(15, "CLAIMS09", when=now)
    claim = IDENTITY.claim(request, now)
    timeout = 2.0  # the lock bound 1.5 s: half a second to spare for the rest of the call
    store = Store(StoreSettings(database.dsn, database.schema, timeout, 8, 16, 0.0, "locked"))
    await nursery.start(store.run)
    await store.wait_ready()
    assert await store.claim(claim) is None
    assert await store.complete(outcome_of(claim, answer(request, "00"), state="answered"))
    holding, go, released = threading.Event(), threading.Event(), trio.Event()

    async def other_session() -> None:
        lock = partial(_locked, database, LOCKS[locked], claim.key, holding, go)
        await trio.to_thread.run_sync(lock)
        released.set()

    nursery.start_soon(other_session)
    try:
        assert await trio.to_thread.run_sync(holding.wait, 10)
        started = trio.current_time()
        assert await store.hold_for_replay(claim.key) is None
        waited = trio.current_time() - started
        assert proxy.store.REPLAY_LOCK_SHARE * timeout <= waited < timeout
        assert store.ready
    finally:
        go.set()  # never a thread left waiting
    with trio.fail_after(10):
        await released.wait()
    hold = await store.hold_for_replay(claim.key)
    assert hold is not None
    await store.release_hold(hold, delivered=False)


def _locked(
    database: Database, sql: str, key: str, holding: threading.Event, go: threading.Event
) -> None:
    """Another session: `sql` (a lock, given `key` if it takes a parameter) run in a
    transaction kept open until `go` (10 s at most)."""

    async def lock() -> None:
        connection = await asyncpg.connect(
            database.dsn, server_settings={"search_path": database.schema}
        )
        try:
            async with connection.transaction():
                await connection.execute(sql, *([key] if "$1" in sql else []))
                holding.set()
                await asyncio.get_running_loop().run_in_executor(None, go.wait, 10)
        finally:
            await connection.close()

    asyncio.run(lock())
