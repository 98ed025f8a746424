"""The store: the Postgres journal, reached from trio through an asyncio loop run inside trio.

asyncpg speaks asyncio only: its coroutines run on an asyncio loop stepped inside trio
(`proxy.bridge`). Every database failure is translated here, once, into
`StoreUnavailable`.

Writes are group-committed (`proxy.batcher`). Claims and outcomes queue together for one
batcher, which takes what has gathered (up to `batch_max`, waiting at most
`batch_wait_ms` for more) and writes it in one statement, one round trip and one commit:
a claim and an outcome are each other's company, so at a given load the batches are
twice as large as with a writer for each, and the round trips (which cost the proxy and
PostgreSQL more than the rows do) half as many. An outcome always follows its claim's
commit, so the two halves of a statement never touch the same new row. The price: a
statement that fails takes its claims and its outcomes with it (claims are inserted in
key order, so instances claiming the same keys at once cannot deadlock). No caller stays
queued past `store.timeout` (the batcher drops it, unwritten): a slow or dead database
costs an RC 96, never an unbounded backlog.

A claim is one `INSERT ... ON CONFLICT DO NOTHING` for the batch: the unique key in the
database, not memory, decides who owns a transaction, so several proxy instances can share
one database. For a key already taken (a repeat, a duplicate, another instance's), its
caller alone then looks up what the journal holds, and reclaims it when it ended without a
switch's answer and may go again: so neither that lookup nor its failure touches the
claims written beside it. An outcome is written once: only a row still `claimed` takes one.

A repeat given an approval whose original answer never reached its terminal must not
meet that approval's reversal being queued at the same moment: `hold_for_replay` locks the
transaction's row (`SELECT ... FOR UPDATE`, in a transaction of its own on a pool
connection) from the repeat's look for a reversal until its answer's delivery is known,
and `queue_reversal` takes the same lock first. So the two decisions are taken one after
the other on one row: the reversal is queued only if the replay did not get through, and
a replay is refused once a reversal is queued. Row locks do not stop the writer: a claim
of a taken key and an outcome of a row no longer `claimed` touch no locked row.

The schema is created and migrated at startup from the versioned SQL files beside this
module, under a transaction-scoped advisory lock, so instances starting together take
turns. When Postgres is down at startup the proxy still starts (not ready; financial
requests get RC 96) and keeps trying to connect in the background. When it fails later,
the store is marked not ready at the first error (callers get RC 96 at once instead of
waiting out their timeouts) and a background probe marks it ready again when a query
passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import trio

from codec import Message, Mti
from proxy.backoff import Backoff
from proxy.batcher import Batcher
from proxy.bridge import Bridge, Stopped
from proxy.decisions import may_reclaim, reverse_after_timeout
from proxy.errors import ProxyError
from proxy.transactions import Claim, Outcome, Recorded, reversal_for, storable

log = logging.getLogger("iso_proxy.store")

T = TypeVar("T")

LEASE_POOL_SIZE = 3  # the smallest pool whose writer keeps a connection (2 left)
LEASE_IDLE = 30.0  # seconds the writer keeps a connection it does not use
LEASE_STATEMENTS = 10_000  # statements on one kept connection before it goes back
MIGRATION_LOCK = 0x150_8583  # pg_advisory_xact_lock key shared by all instances
# A repeat holding its approval's row has this share of `store.timeout` to write its
# answer (`Store.replay_write_bound`), so that an instance queuing the original's reversal
# meanwhile waits well within its own `store.timeout`. PostgreSQL ends a hold left idle in
# its transaction for `REPLAY_HOLD_LIMIT` times `store.timeout` (a hold leaked by a bug).
REPLAY_WRITE_SHARE = 0.5
REPLAY_HOLD_LIMIT = 4
# A repeat waits at most this share of `store.timeout` for its approval's row: locked that
# long, the row is being worked on (another instance queuing the original's reversal, or
# holding it for a repeat of its own), and the approval is not given again unchecked.
REPLAY_LOCK_SHARE = 0.75
# How long a migration waits for a table's lock before it gives up (start-up tries again
# later): while it waits, every other instance's journal writes queue behind it.
MIGRATION_LOCK_TIMEOUT = 0.25
# Database errors, and the OS errors of a lost connection: all mean "store unavailable".
_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# Errors of the data, not the connection: the store is fine, this write is not.
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class StoreUnavailable(ProxyError):
    """The journal could not be reached or answered too slowly; nothing was forwarded."""


async def _keep_session(connection: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is: the journal never changes session state
    (no SET, LISTEN, advisory locks or cursors; asyncpg still rolls back a transaction left
    open), so asyncpg's default RESET ALL, a second round trip for every query, buys
    nothing. A session-level SET added to this module would now outlive its query: don't."""


def dsn_problem(dsn: str) -> str | None:
    """What makes `dsn` unusable as a PostgreSQL URL, said without repeating any of it
    (a password with a stray '#' or '/' would otherwise end up in an error message)."""
    try:
        url = urlsplit(dsn)
        url.port  # noqa: B018 - raises ValueError when what follows ':' is not a port
        parse_qsl(url.query, strict_parsing=bool(url.query))
    except ValueError:
        url = None
    if url is None or url.scheme not in ("postgresql", "postgres") or url.fragment:
        return (
            "not a valid postgresql:// URL (in the password, percent-encode "
            "'#', '/', '?', '@' and ':', e.g. '#' as %23)"
        )
    return None


def session_settings(schema: str | None) -> dict[str, str]:
    """The journal's connections' settings. Every statement is planned for its own
    parameters: a plan PostgreSQL caches while the journal is small scans the whole table
    (the cheapest way then) and goes on doing so as the table grows, until something
    analyzes it; PostgreSQL's CPU a row rose from 140 to 870 us over 120 000 rows that
    way, where planned each time it stays near 75 (BENCHMARKS.md). READ COMMITTED whatever
    the server's default: the row locks that order a replay and a reversal
    (`hold_for_replay`) rely on it. PostgreSQL 12+."""
    settings = {
        "plan_cache_mode": "force_custom_plan",
        "default_transaction_isolation": "read committed",
    }
    if schema:
        settings["search_path"] = schema
    return settings


@dataclass(frozen=True, slots=True)
class StoreSettings:
    dsn: str = field(repr=False)  # may hold a password
    schema: str | None
    timeout: float
    pool_size: int
    batch_max: int
    batch_wait: float
    instance: str


class _Lease:
    """One pool connection the writer keeps from one write to the next (it writes one batch
    at a time): no acquire and release for every batch, which cost the proxy about a
    tenth of its time at 1 000 TPS (asyncpg releases through an `asyncio.shield` task).
    Given back when a write fails or it is found closed (the pool replaces a broken
    connection), when the store closes, after `LEASE_STATEMENTS` statements, and once
    unused for `LEASE_IDLE` seconds: an idle connection must be the pool's, which closes it
    after a while, or one that a firewall dropped silently at night would be kept for
    hours and cost the morning's first batch its timeout. Runs on the bridge's loop."""

    def __init__(self) -> None:
        self._connection: asyncpg.Connection | None = None
        self._statements = 0
        self._busy = False
        self._used_at = 0.0  # on the bridge loop's clock
        self._idle_check: asyncio.TimerHandle | None = None
        self._releasing: asyncio.Task[None] | None = None

    async def fetch(
        self, pool: asyncpg.Pool, sql: str, args: Sequence[Any]
    ) -> list[asyncpg.Record]:
        if self._connection is not None and (
            _closed(self._connection)  # lost while kept (the database restarted, say)
            or self._statements >= LEASE_STATEMENTS
        ):
            await self.release(pool)
        if self._connection is None:
            self._connection = await pool.acquire()
            self._statements = 0
            self._watch_idle(pool)
        self._busy = True
        try:
            rows: list[asyncpg.Record] = await self._connection.fetch(sql, *args)
        except BaseException:
            await self.release(pool)
            raise
        finally:
            self._busy = False
            self._used_at = asyncio.get_running_loop().time()
        self._statements += 1
        return rows

    async def release(self, pool: asyncpg.Pool) -> None:
        await _give_back(pool, self._take())

    def _take(self) -> asyncpg.Connection | None:
        """The kept connection, no longer kept (at once: the next write takes another)."""
        connection, self._connection = self._connection, None
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        return connection

    def _watch_idle(self, pool: asyncpg.Pool) -> None:
        """Check, `LEASE_IDLE` after the last use, whether the connection is still unused."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            self._idle_check = None
            if self._connection is None:
                return
            unused = 0.0 if self._busy else loop.time() - self._used_at
            if unused < LEASE_IDLE:
                self._idle_check = loop.call_later(LEASE_IDLE - unused, check)
            else:  # unused all along: the pool's again (a task kept, or it may be collected)
                self._releasing = loop.create_task(_give_back(pool, self._take()))

        self._used_at = loop.time()
        self._idle_check = loop.call_later(LEASE_IDLE, check)


async def _give_back(pool: asyncpg.Pool, connection: asyncpg.Connection | None) -> None:
    if connection is not None:
        with contextlib.suppress(asyncpg.InterfaceError):  # the pool took it back already
            await pool.release(connection)


def _closed(connection: asyncpg.Connection) -> bool:
    """Whether a kept connection is gone: closed, or taken back by the pool when its
    socket closed (its proxy then refuses every call with InterfaceError)."""
    try:
        closed: bool = connection.is_closed()
    except asyncpg.InterfaceError:
        return True
    return closed


@dataclass(frozen=True, eq=False)
class ReplayHold:
    """An approval's row, locked while a repeat is given that approval (see
    `Store.hold_for_replay`)."""

    key: str


_Held = tuple[asyncpg.Connection, Any]  # the connection, and its open transaction


async def _hold(
    pool: asyncpg.Pool,
    hold: ReplayHold,
    holds: dict[ReplayHold, _Held],
    limit_s: float,
    lock_wait_s: float,
) -> bool:
    """In the bridge's loop: lock the row, then look for a reversal (a statement of its own,
    in READ COMMITTED, so that it sees one committed while it waited for the lock). Held
    (True) with none; else the transaction is rolled back: a reversal was seen, or the row
    (or the reversals table) stayed locked for `lock_wait_s` (PostgreSQL's `lock_timeout`,
    for these two statements only: an answer of its own, which says nothing against the
    database)."""
    connection = await pool.acquire()
    transaction = connection.transaction(isolation="read_committed")
    try:
        await transaction.start()
        await connection.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', $1, true),"
            " set_config('lock_timeout', $2, true)",
            f"{round(limit_s * 1000)}ms",
            f"{max(1, round(lock_wait_s * 1000))}ms",
        )
        try:
            await connection.execute(_HOLD_ROW, hold.key)
            refused = await connection.fetchval(_REVERSAL_SEEN, hold.key)  # a reversal queued
        except asyncpg.LockNotAvailableError:  # the row, or the reversals table (a migration)
            log.warning("replay refused: its row or its reversal stayed locked %.2fs", lock_wait_s)
            refused = True  # someone else is at it
        else:  # held: the replay's note (`_release`) waits for locks as it always did (the
            # session's own setting again, for the rest of this transaction)
            await connection.execute("RESET lock_timeout")
    except BaseException:
        await _end_transaction(pool, connection, transaction, commit=False)
        raise
    if refused:
        await _end_transaction(pool, connection, transaction, commit=False)
        return False
    holds[hold] = (connection, transaction)
    return True


async def _release(
    pool: asyncpg.Pool, hold: ReplayHold, holds: dict[ReplayHold, _Held], delivered: bool
) -> None:
    """In the bridge's loop: end a hold, noting the replay when it was delivered."""
    held = holds.pop(hold, None)
    if held is None:  # let go already (by the store's stop): its note, if any, is lost
        if delivered:
            raise Stopped("the hold ended before its replay was noted")
        return
    connection, transaction = held
    if delivered:
        try:
            await connection.execute(_MARK_REPLAYED, hold.key)
        except BaseException:
            await _end_transaction(pool, connection, transaction, commit=False)
            raise
    await _end_transaction(pool, connection, transaction, commit=delivered)


async def _end_transaction(
    pool: asyncpg.Pool, connection: asyncpg.Connection, transaction: Any, *, commit: bool
) -> None:
    """Commit or roll back, then give the connection back (asyncpg rolls back what is
    left open)."""
    try:
        if commit:
            await transaction.commit()
        else:
            with contextlib.suppress(*_DATABASE_ERRORS):
                await transaction.rollback()
    finally:
        await _give_back(pool, connection)


class Store:
    """The journal. `run` keeps it connected; `claim`, `complete` and `recorded` use it."""

    def __init__(self, settings: StoreSettings) -> None:
        self._settings = settings
        self._rng = random.Random()
        self._bridge: Bridge | None = None
        self._pool: asyncpg.Pool | None = None
        self._ready = trio.Event()
        self._broken = trio.Event()
        # One connection kept by the writer, where the pool has room for the other queries
        # beside it.
        self._lease = _Lease() if settings.pool_size >= LEASE_POOL_SIZE else None
        # Rows held for replays (`hold_for_replay`), by hold: on the bridge's loop only.
        self._holds: dict[ReplayHold, _Held] = {}
        self._writes: Batcher[Claim | Outcome, Written] = Batcher(
            self._flush_writes,
            settings.batch_max,
            settings.batch_wait,
            settings.timeout,
            item_errors=_DATA_ERRORS,
        )

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying with backoff while Postgres is down), migrate, write batches."""
        bridge = self._bridge = Bridge()
        async with trio.open_nursery() as loop_nursery:
            loop_nursery.start_soon(bridge.drive)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writes.run)
                    task_status.started()
                    await self._connect()
                    self._ready.set()
                    while True:
                        await self._broken.wait()
                        self._broken = trio.Event()
                        await self._heal()
                        self._ready.set()
                        log.info("store: reachable again")
            finally:
                self._ready = trio.Event()  # new calls fail at once from here on
                with trio.CancelScope(shield=True):
                    try:
                        if self._pool is not None:
                            pool = self._pool
                            with trio.move_on_after(5):
                                for hold in list(self._holds):  # else close waits for them
                                    with contextlib.suppress(Exception):
                                        await bridge.call(_release(pool, hold, self._holds, False))
                                if self._lease is not None:  # else close waits for it
                                    try:
                                        await bridge.call(self._lease.release(pool))
                                    except Exception as error:  # closed all the same
                                        log.warning("store: closing: %s", type(error).__name__)
                                await bridge.call(pool.close())
                    except Exception as error:
                        log.warning("store: closing: %s", type(error).__name__)
                    finally:
                        await bridge.close()

    async def claim(self, claim: Claim) -> Recorded | None:
        """Claim `claim.key`: None when it is ours now, else what the journal holds."""
        return await self._guarded(partial(self._claim, claim))

    async def _claim(self, claim: Claim, deadline: float) -> Recorded | None:
        claimed = await self._writes.submit(claim, deadline)
        if claimed is TAKEN:
            return await self._taken(claim, deadline)
        assert not isinstance(claimed, bool)  # a claim's result
        return claimed

    async def reassign(self, key: str, switch: str) -> bool:
        """Name `switch` as where the claim of `key` is forwarded (before anything is
        written to it); False when the claim is no longer open."""
        rows = await self._guarded(partial(self._query_by, _REASSIGN, [key, switch]))
        return bool(rows)

    async def complete(self, outcome: Outcome) -> bool:
        """Record how a claimed transaction ended. False when it already had an outcome."""
        return await self._guarded(partial(self._complete, outcome))

    async def _complete(self, outcome: Outcome, deadline: float) -> bool:
        written = await self._writes.submit(outcome, deadline)
        assert isinstance(written, bool)  # an outcome's result
        return written

    async def recorded(self, key: str) -> Recorded | None:
        """What the journal holds for `key`, if anything."""
        return await self._guarded(partial(self._held, key))

    async def _held(self, key: str, deadline: float) -> Recorded | None:
        rows = await self._query_by(_SELECT_RECORDED, [[key]], deadline)
        return _recorded(rows[0]) if rows else None

    async def _guarded(self, work: Callable[[float], Awaitable[T]]) -> T:
        """`work(deadline)` within store.timeout; every failure becomes StoreUnavailable."""
        if not self.ready:
            raise StoreUnavailable("store not connected")
        try:
            return await work(trio.current_time() + self._settings.timeout)
        except trio.TooSlowError:
            raise StoreUnavailable(f"store slower than {self._settings.timeout:g} s") from None
        except Stopped:
            raise StoreUnavailable("store stopping") from None
        except _DATA_ERRORS as error:  # this write's data; the store itself is fine
            raise StoreUnavailable(f"store refused the data: {type(error).__name__}") from None
        except _DATABASE_ERRORS as error:
            self._lost(error)
            raise StoreUnavailable(f"store error: {type(error).__name__}") from None

    async def _query_by(
        self, sql: str, args: Sequence[Any], deadline: float
    ) -> list[asyncpg.Record]:
        with trio.move_on_at(deadline):
            return await self._query(sql, args)
        raise trio.TooSlowError

    def _lost(self, error: BaseException) -> None:
        if self.ready:
            log.warning("store: unreachable (%s)", type(error).__name__)
            self._ready = trio.Event()
            self._broken.set()

    async def _heal(self) -> None:
        """Probe until a query passes again (asyncpg replaces broken connections)."""
        pool, bridge = self._pool, self._bridge
        assert pool is not None and bridge is not None
        backoff = Backoff(initial=0.1, maximum=5.0)
        attempt = 0
        while True:
            with trio.move_on_after(self._settings.timeout):
                try:
                    await bridge.call(pool.fetchval("SELECT 1"))
                    return
                except _DATABASE_ERRORS:
                    pass
            await trio.sleep(backoff.delay(attempt, self._rng))
            attempt += 1

    async def _connect(self) -> None:
        backoff = Backoff(initial=0.5, maximum=10.0)
        attempt = 0
        while True:
            try:
                assert self._bridge is not None
                self._pool = await self._bridge.call(self._open_pool())
                log.info("store: connected")
                return
            except Exception as error:
                log.warning("store: cannot connect or migrate (%s); retrying", type(error).__name__)
            await trio.sleep(backoff.delay(attempt, self._rng))
            attempt += 1

    async def _open_pool(self) -> asyncpg.Pool:
        settings = self._settings
        async with asyncio.timeout(max(settings.timeout, 5.0)):
            pool = await asyncpg.create_pool(
                settings.dsn,
                min_size=1,
                max_size=settings.pool_size,
                server_settings=session_settings(settings.schema),
                command_timeout=settings.timeout,
                timeout=max(settings.timeout, 1.0),  # each (re)connect
                reset=_keep_session,
            )
        try:
            async with pool.acquire() as connection:
                await _migrate(connection, settings.schema)
        except BaseException:
            await pool.close()
            raise
        return pool

    async def _query(
        self, sql: str, args: Sequence[Any], *, kept: bool = False
    ) -> list[asyncpg.Record]:
        """`sql` on a pool connection, or on the writer's lease when `kept` and it has one."""
        pool, bridge = self._pool, self._bridge
        assert pool is not None and bridge is not None
        lease = self._lease if kept else None
        query = lease.fetch(pool, sql, args) if lease else pool.fetch(sql, *args)
        rows: list[asyncpg.Record] = await bridge.call(query)
        return rows

    async def _flush_writes(self, writes: list[Claim | Outcome]) -> list[Written]:
        """One statement for the batch's claims and outcomes. A claim gets None when it
        won its key, or `TAKEN`, for its caller to look up (`_taken`): so that looking up a
        repeat's row, or its failure, never touches the writes beside it. An outcome gets
        whether it was written (only a row still claimed takes one; of two for one key in
        a batch, the first).

        Claims are inserted in key order, as every instance does: two instances claiming
        the same keys at once then wait for each other in one order, never in a circle
        (PostgreSQL would abort one statement, and with it the outcomes beside its claims).
        This relies on the claims' CTE running before the outcomes' (the final UNION ALL
        reads it first; PostgreSQL does not promise an order): the outcomes update only
        rows this instance claimed, so they wait for no other instance in any case.
        """
        claims: dict[str, Claim] = {}
        outcomes: dict[str, Outcome] = {}
        for write in writes:
            if isinstance(write, Claim):
                claims.setdefault(write.key, write)
            else:
                outcomes.setdefault(write.key, write)
        statement = journal_statement(
            [claims[key] for key in sorted(claims)],
            list(outcomes.values()),
            self._settings.instance,
        )
        rows = await self._query(*statement, kept=True)
        won = {row["tx_key"] for row in rows if row["claim"]}
        written = {row["tx_key"] for row in rows if not row["claim"]}
        return [
            (
                (None if claims[write.key] is write else _in_flight(claims[write.key]))
                if write.key in won  # else: a twin in this very batch won, and is in flight
                else TAKEN
            )
            if isinstance(write, Claim)
            else outcomes[write.key] is write and write.key in written
            for write in writes
        ]

    async def _taken(self, claim: Claim, deadline: float) -> Recorded | None:
        """For a key already claimed (a repeat, a duplicate, another instance's): what the
        journal holds for it; None when it had ended without a switch's answer and may go
        again, and this call reclaimed it (atomically: one claimant wins)."""
        held = await self._held(claim.key, deadline)
        if held is None:  # no key is ever deleted: not reached
            return _in_flight(claim)
        if held.fingerprint == claim.fingerprint and may_reclaim(held.state, Mti.parse(claim.mti)):
            args = [[claim.key], [claim.mti], [held.state], [claim.switch], self._settings.instance]
            if await self._query_by(_RECLAIM, args, deadline):
                return None
        return held

    async def record_late(self, key: str, rc: str, latency_ms: float) -> None:
        """A switch's answer that came after the deadline: recorded, never delivered."""
        args = [key, storable(rc), latency_ms]
        await self._guarded(partial(self._query_by, _RECORD_LATE, args))

    async def queue_reversal(
        self, key: str, switch: str | None, reversal: Message, why: str
    ) -> Queued:
        """Queue the reversal of `key`, once; not when a repeat was given the approval
        (`mark_replayed`). NOW: this call inserted it; NOT_NEEDED: a repeat was given the
        approval and no reversal was seen; else ALREADY. It takes the row's lock first, so
        a repeat holding the row for a replay (`hold_for_replay`) is waited for. One
        statement, so "seen" is as of its snapshot: an earlier try of this very reversal
        whose reply was lost may still commit after it."""
        args = [key, switch, reversal.mti.code, json.dumps(dict(reversal.fields)), why]
        rows = await self._guarded(partial(self._query_by, _QUEUE_REVERSAL, args))
        row = rows[0]
        if row["queued_now"]:
            return Queued.NOW
        return Queued.NOT_NEEDED if row["replayed"] and not row["reversal_seen"] else Queued.ALREADY

    async def mark_replayed(self, key: str) -> None:
        """Note that a repeat was given the approval held for `key` (an answered row; its
        write succeeded): the original's reversal, if its own answer never got through, is
        then not queued, by any instance."""
        await self._guarded(partial(self._query_by, _MARK_REPLAYED, [key]))

    async def hold_for_replay(self, key: str) -> ReplayHold | None:
        """Lock `key`'s row before its approval is given to a repeat: None when a reversal of
        it was ever queued, or the row stayed locked for `REPLAY_LOCK_SHARE` of
        store.timeout (the approval is not to be given again, at least not now). Until
        `release_hold`, another instance queuing that reversal (`queue_reversal`) waits, and
        then finds the replay noted if the repeat's terminal got it. StoreUnavailable when
        the journal cannot tell."""
        hold = ReplayHold(key)
        try:
            held = await self._guarded(partial(self._take_hold, hold))
        except BaseException:
            await self.release_hold(hold, delivered=False)  # taken as the call was cut short
            raise
        return hold if held else None

    async def _take_hold(self, hold: ReplayHold, deadline: float) -> bool:
        bridge, pool = self._bridge, self._pool
        assert bridge is not None and pool is not None  # `_guarded` found the store ready
        timeout = self._settings.timeout
        limit, lock_wait = REPLAY_HOLD_LIMIT * timeout, REPLAY_LOCK_SHARE * timeout
        with trio.move_on_at(deadline):
            return await bridge.call(_hold(pool, hold, self._holds, limit, lock_wait))
        raise trio.TooSlowError

    @property
    def replay_write_bound(self) -> float:
        """Seconds a replay holding its row has to write its answer (from the hold)."""
        return REPLAY_WRITE_SHARE * self._settings.timeout

    async def release_hold(self, hold: ReplayHold, *, delivered: bool) -> None:
        """End a hold: with `delivered`, the replay is noted (`mark_replayed`) as the lock
        goes; else nothing is written. Shielded (a stop must not leave the row locked) and
        bounded; a failure is logged (PostgreSQL then rolls the hold back)."""
        bridge, pool = self._bridge, self._pool
        if bridge is None or pool is None:
            return
        why = ""
        with trio.CancelScope(shield=True), trio.move_on_after(self._settings.timeout) as bound:
            try:
                await bridge.call(_release(pool, hold, self._holds, delivered))
            except (Stopped, *_DATABASE_ERRORS) as error:
                why = type(error).__name__
        if bound.cancelled_caught:
            why = "store too slow"
        if why and delivered:  # the original's instance may reverse what the terminal holds
            log.error("approval replayed; its delivery not noted (%s)", why)
        elif why:
            log.warning("replay hold not ended cleanly (%s)", why)

    async def recover(self, older_than: float, reversal_mti: str) -> int:
        """Claims left open longer than any transaction can take (a crash, or an outcome
        that could not be written): closed as timed out, each with a reversal queued, once
        (rows are locked and skipped, so instances recovering together never overlap)."""
        bridge, pool = self._bridge, self._pool
        if not self.ready or bridge is None or pool is None:
            raise StoreUnavailable("store not connected")
        try:
            with trio.fail_after(self._settings.timeout * 5):
                return await bridge.call(_recover(pool, older_than, reversal_mti))
        except trio.TooSlowError:
            raise StoreUnavailable("recovery slower than expected") from None
        except Stopped:
            raise StoreUnavailable("store stopping") from None
        except _DATABASE_ERRORS as error:
            raise StoreUnavailable(f"store error: {type(error).__name__}") from None

    async def reversals_queued(self) -> int:
        """Reversals waiting to be sent or acknowledged."""
        rows = await self._guarded(partial(self._query_by, _COUNT_QUEUED, []))
        return int(rows[0]["queued"])

    async def lease_reversals(self, limit: int, lease: float) -> list[DueReversal]:
        """Due reversals for this instance to send, oldest first, leased for `lease` seconds
        (other instances skip them meanwhile: each is sent by one instance at a time). One
        whose earlier holder's lease lapsed counts that holder's attempt (it may have been
        sent) when none is counted, so that what follows is a repeat."""
        rows = await self._guarded(
            partial(self._query_by, _LEASE_REVERSALS, [self._settings.instance, limit, lease])
        )
        rows = sorted(rows, key=lambda row: row["id"])
        return [
            DueReversal(
                r["id"],
                r["tx_key"],
                r["switch"],
                r["mti"],
                json.loads(r["message"]),
                r["attempts"],
                r["lapsed"],
            )
            for r in rows
        ]

    async def reversal_sent(
        self, reversal_id: int, state: str, rc: str | None, retry_in: float, written: bool
    ) -> bool:
        """After an attempt: `acknowledged`, `failed` (given up), or `queued` again; an
        attempt counts only if the reversal was `written`. False when this instance's
        lease had lapsed and another holds the reversal, or has settled it meanwhile (an
        acknowledgment always lands)."""
        args = [
            reversal_id,
            state,
            storable(rc) if rc is not None else None,
            retry_in,
            self._settings.instance,
            written,
        ]
        return bool(await self._guarded(partial(self._query_by, _REVERSAL_SENT, args)))


@dataclass(frozen=True, slots=True)
class DueReversal:
    id: int
    tx_key: str
    switch: str | None
    mti: str
    fields: dict[str, str] = field(repr=False)
    attempts: int
    lapsed: bool  # an earlier holder's lease ran out: it may have written it

    def message(self) -> Message:
        return Message(Mti.parse(self.mti), self.fields)


async def _recover(pool: asyncpg.Pool, older_than: float, reversal_mti: str) -> int:
    """In the bridge's loop: close orphaned claims and queue their reversals, atomically."""
    now = datetime.now(UTC)
    async with pool.acquire() as connection, connection.transaction():
        rows = await connection.fetch(_ORPHANS, older_than)
        for row in rows:
            if not reverse_after_timeout(Mti.parse(row["mti"])):
                continue
            reversal = reversal_for(json.loads(row["request"]), row["mti"], reversal_mti, now)
            await connection.execute(
                _QUEUE_REVERSAL,
                row["tx_key"],
                row["switch"],
                reversal.mti.code,
                json.dumps(dict(reversal.fields)),
                "recovered",
            )
        return len(rows)


async def _migrate(connection: asyncpg.Connection, schema: str | None) -> None:
    """Apply the SQL files not applied yet, in order, one instance at a time; a table
    another session holds (a long report, a dump) is waited for `MIGRATION_LOCK_TIMEOUT`
    seconds at most, then LockNotAvailableError."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        lock_timeout = f"{round(MIGRATION_LOCK_TIMEOUT * 1000)}ms"
        await connection.execute("SELECT set_config('lock_timeout', $1, true)", lock_timeout)
        exists = await connection.fetchval(
            "SELECT true FROM pg_namespace WHERE nspname = $1", schema
        )
        if schema and not exists:  # a DBA may have made it for a role that cannot
            await connection.execute(f'CREATE SCHEMA "{schema}"')
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {
            r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")
        }
        files = sorted(
            (f for f in (resources.files("proxy") / "sql").iterdir() if f.name.endswith(".sql")),
            key=lambda f: f.name,
        )
        for file in files:
            version = file.name.removesuffix(".sql")
            if version in applied:
                continue
            await connection.execute(file.read_text(encoding="utf-8"))
            await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("store: applied migration %s", version)


def journal_statement(
    claims: Sequence[Claim], outcomes: Sequence[Outcome], instance: str
) -> tuple[str, list[Any]]:
    """The one statement that writes `claims` (distinct keys) and `outcomes`, and its
    parameters (a column array each). Each row it returns says whether it is a claim won
    or an outcome written, and its key. The outcomes' reversals (a timeout's) are queued
    in the same statement when any has one; else the plain update, which costs PostgreSQL
    about a quarter less a row."""
    args: list[Any] = []
    if claims:
        args += [
            [c.key for c in claims],
            [c.mti for c in claims],
            [c.terminal for c in claims],
            [c.stan for c in claims],
            [c.acquirer for c in claims],
            [c.rrn for c in claims],
            [c.tx_date for c in claims],
            [c.fingerprint for c in claims],
            [c.pan_masked for c in claims],
            [c.pan_hash for c in claims],
            [json.dumps(dict(c.fields)) for c in claims],
            [c.switch for c in claims],
            instance,
        ]
    if outcomes:
        args += [
            [o.key for o in outcomes],
            [o.state for o in outcomes],
            [o.rc for o in outcomes],
            [o.response_mti for o in outcomes],
            [o.auth_code for o in outcomes],
            [json.dumps(dict(o.fields)) for o in outcomes],
            [",".join(o.field_names) for o in outcomes],
            [o.switch for o in outcomes],
            [o.link for o in outcomes],
            [o.latency_ms for o in outcomes],
        ]
    reversing = any(o.reversal for o in outcomes)
    if reversing:
        args.append([o.reversal.mti.code if o.reversal else None for o in outcomes])
        args.append([json.dumps(dict(o.reversal.fields)) if o.reversal else None for o in outcomes])
    return _JOURNAL[bool(claims), bool(outcomes), reversing], args


def _recorded(row: asyncpg.Record) -> Recorded:
    names = row["response_fields"]
    return Recorded(
        fingerprint=bytes(row["fingerprint"]),
        state=row["state"],
        rc=row["rc"],
        response_mti=row["response_mti"],
        fields=json.loads(row["response"]) if row["response"] else {},
        field_names=tuple(names) if names else (),
        switch=row["switch"],
    )


class Queued(enum.Enum):
    """What queuing a reversal did."""

    NOW = "queued"
    ALREADY = "already queued"  # before this call (whatever became of it since)
    NOT_NEEDED = "not needed"  # a repeat was given the approval, and no reversal was seen


class _Taken(enum.Enum):
    """A claim's key was already in the journal: its caller looks up what is there."""

    TAKEN = "taken"


TAKEN = _Taken.TAKEN
Written = Recorded | _Taken | bool | None  # what a claim's or an outcome's write gives


def _in_flight(claim: Claim) -> Recorded:
    return Recorded(claim.fingerprint, "claimed", None, None, {}, ())


# The journal's writes, built from the constants below only: no value ever reaches the text.
# A claim: what is already taken is looked up afterwards, only when something was.
_CLAIM_COLUMNS = (
    ("tx_key", "text"),
    ("mti", "text"),
    ("terminal", "text"),
    ("stan", "text"),
    ("acquirer", "text"),
    ("rrn", "text"),
    ("tx_date", "date"),
    ("fingerprint", "bytea"),
    ("pan_masked", "text"),
    ("pan_hash", "bytea"),
    ("request", "text"),
    ("switch", "text"),
)
# An outcome: only a row still claimed takes one.
_OUTCOME_COLUMNS = (
    ("tx_key", "text"),
    ("state", "text"),
    ("rc", "text"),
    ("response_mti", "text"),
    ("auth_code", "text"),
    ("response", "text"),
    ("response_fields", "text"),
    ("switch", "text"),
    ("link", "text"),
    ("latency_ms", "float8"),
)
_REVERSAL_COLUMNS = (("reversal_mti", "text"), ("reversal", "text"))


def _unnest(columns: Sequence[tuple[str, str]], first: int, alias: str) -> str:
    """`unnest` of one array parameter a column, numbered from `$first`, as `alias`."""
    arrays = ", ".join(f"${n}::{kind}[]" for n, (_, kind) in enumerate(columns, first))
    return f"unnest({arrays}) AS {alias}({', '.join(name for name, _ in columns)})"


def _claim_insert() -> str:
    names = ", ".join(name for name, _ in _CLAIM_COLUMNS)
    values = ", ".join(
        f"{name}::jsonb" if name == "request" else name for name, _ in _CLAIM_COLUMNS
    )
    return f"""INSERT INTO transactions ({names}, state, instance)
    SELECT {values}, 'claimed', ${len(_CLAIM_COLUMNS) + 1}
    FROM {_unnest(_CLAIM_COLUMNS, 1, "t")}
    ON CONFLICT (tx_key) DO NOTHING
    RETURNING true AS claim, tx_key"""  # noqa: S608 - constants only


def _outcome_update(source: str) -> str:
    return f"""UPDATE transactions t
    SET state = u.state, rc = u.rc, response_mti = u.response_mti, auth_code = u.auth_code,
        response = u.response::jsonb, response_fields = string_to_array(u.response_fields, ','),
        switch = u.switch, link = u.link, latency_ms = u.latency_ms, completed_at = now()
    FROM {source}
    WHERE t.tx_key = u.tx_key AND t.state = 'claimed'
    RETURNING false AS claim, t.tx_key"""  # noqa: S608 - constants only


def _journal_sql(claims: bool, outcomes: bool, reversing: bool) -> str:
    """The statement for a batch with `claims`, `outcomes`, and reversals among them."""
    first = len(_CLAIM_COLUMNS) + 2 if claims else 1  # the outcomes' first parameter
    if not outcomes:
        return _claim_insert()
    if not reversing and not claims:
        return _outcome_update(_unnest(_OUTCOME_COLUMNS, first, "u"))
    parts = [f"claimed AS ({_claim_insert()})"] if claims else []
    if reversing:
        source = _unnest(_OUTCOME_COLUMNS + _REVERSAL_COLUMNS, first, "u")
        parts += [
            f"u AS (SELECT * FROM {source})",  # noqa: S608 - constants only
            f"done AS ({_outcome_update('u')})",
            """queued AS (
    INSERT INTO reversals (tx_key, switch, mti, message, state, reason)
    SELECT u.tx_key, u.switch, u.reversal_mti, u.reversal::jsonb, 'queued', u.state
    FROM u JOIN done ON done.tx_key = u.tx_key
    WHERE u.reversal_mti IS NOT NULL
    ON CONFLICT (tx_key) DO NOTHING)""",
        ]
    else:
        parts.append(f"done AS ({_outcome_update(_unnest(_OUTCOME_COLUMNS, first, 'u'))})")
    rows = ["SELECT claim, tx_key FROM done"]
    if claims:
        rows.insert(0, "SELECT claim, tx_key FROM claimed")
    return "WITH " + ",\n".join(parts) + "\n" + "\nUNION ALL\n".join(rows)


_JOURNAL = {
    (claims, outcomes, reversing): _journal_sql(claims, outcomes, reversing)
    for claims, outcomes, reversing in [
        (True, False, False),
        (False, True, False),
        (False, True, True),
        (True, True, False),
        (True, True, True),
    ]
}

_RECLAIM = """
UPDATE transactions t
SET state = 'claimed', mti = u.mti, instance = $5, claimed_at = now(), completed_at = NULL,
    switch = u.switch, link = NULL, rc = NULL, response_mti = NULL, auth_code = NULL,
    response = NULL, response_fields = NULL, latency_ms = NULL, replayed_at = NULL
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(tx_key, mti, from_state, switch)
WHERE t.tx_key = u.tx_key AND t.state = u.from_state
RETURNING t.tx_key
"""

_REASSIGN = """
UPDATE transactions SET switch = $2 WHERE tx_key = $1 AND state = 'claimed' RETURNING tx_key
"""

_SELECT_RECORDED = """
SELECT tx_key, fingerprint, state, rc, response_mti, response, response_fields, switch
FROM transactions WHERE tx_key = ANY($1::text[])
"""

_RECORD_LATE = """
UPDATE transactions SET late_rc = $2, late_latency_ms = $3 WHERE tx_key = $1 RETURNING tx_key
"""

# One row, saying what it did: queued now; else whether a repeat was given the approval,
# and whether a reversal was there (both as the statement's snapshot saw them: one that
# another transaction commits while this waits on ON CONFLICT is not seen).
_QUEUE_REVERSAL = """
WITH held AS (
    SELECT replayed_at FROM transactions WHERE tx_key = $1 FOR UPDATE
), replayed AS (
    SELECT 1 FROM held WHERE replayed_at IS NOT NULL
), queued AS (
    INSERT INTO reversals (tx_key, switch, mti, message, state, reason)
    SELECT $1, $2, $3, $4::jsonb, 'queued', $5
    WHERE NOT EXISTS (SELECT 1 FROM replayed)
    ON CONFLICT (tx_key) DO NOTHING
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM queued) AS queued_now,
       EXISTS (SELECT 1 FROM replayed) AS replayed,
       EXISTS (SELECT 1 FROM reversals WHERE tx_key = $1) AS reversal_seen
"""

_MARK_REPLAYED = """
UPDATE transactions SET replayed_at = now()
WHERE tx_key = $1 AND state = 'answered' AND replayed_at IS NULL
"""

_HOLD_ROW = "SELECT 1 FROM transactions WHERE tx_key = $1 FOR UPDATE"

_REVERSAL_SEEN = "SELECT EXISTS (SELECT 1 FROM reversals WHERE tx_key = $1)"

_LEASE_REVERSALS = """
WITH due AS (
    SELECT id, leased_by IS NOT NULL AS lapsed FROM reversals
    WHERE state = 'queued' AND next_attempt_at <= now()
      AND (lease_until IS NULL OR lease_until < now())
    ORDER BY id
    FOR UPDATE SKIP LOCKED
    LIMIT $2
)
UPDATE reversals r
SET leased_by = $1, lease_until = now() + make_interval(secs => $3), updated_at = now(),
    attempts = CASE WHEN due.lapsed THEN greatest(r.attempts, 1) ELSE r.attempts END
FROM due
WHERE r.id = due.id
RETURNING r.id, r.tx_key, r.switch, r.mti, r.message, r.attempts, due.lapsed
"""

_REVERSAL_SENT = """
UPDATE reversals
SET state = $2, last_rc = $3, leased_by = NULL, lease_until = NULL, updated_at = now(),
    next_attempt_at = now() + make_interval(secs => $4),
    attempts = attempts + CASE WHEN $6 THEN 1 ELSE 0 END
WHERE id = $1 AND state <> 'acknowledged'
  AND ($2 = 'acknowledged' OR (state = 'queued' AND (leased_by = $5 OR leased_by IS NULL)))
RETURNING id
"""

_ORPHANS = """
UPDATE transactions
SET state = 'timed_out', rc = '96', completed_at = now()
WHERE tx_key IN (
    SELECT tx_key FROM transactions
    WHERE state = 'claimed' AND claimed_at < now() - make_interval(secs => $1)
    FOR UPDATE SKIP LOCKED
)
RETURNING tx_key, mti, switch, request
"""

_COUNT_QUEUED = "SELECT count(*) AS queued FROM reversals WHERE state = 'queued'"
