"""The journal's statements find rows by the transaction key's index however the table
grew: a plan PostgreSQL cached while the table was small scans it whole, and went on doing
so for every batch as it grew (the journal's connections plan each statement afresh)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import trio

from codec import Message
from fixtures.messages import financial
from proxy.responses import answer
from proxy.store import _migrate, journal_statement, session_settings
from proxy.transactions import Claim, Outcome, TransactionIdentity, outcome_of, reversal_for
from tests.conftest import Database

IDENTITY = TransactionIdentity(("32", "41", "11", "37", "7"), b"plans-test-key")
INSTANCE = "plans-test"
SMALL, GROWN = 10, 20_000


async def _plans_on_a_grown_table(dsn: str, schema: str) -> list[str]:
    """Run each of the journal's write statements (claims, outcomes plain or queueing a
    reversal, and both together), each prepared once, as the journal's session does: a few
    times on a small table, then explain them once the table has grown."""
    connection = await asyncpg.connect(dsn, server_settings=session_settings(schema))
    try:
        await _migrate(connection, schema)
        now = datetime.now(UTC)
        fresh = itertools.count()
        statements: dict[str, asyncpg.prepared_stmt.PreparedStatement] = {}

        async def batch(name: str) -> list[Any]:
            """The parameters of a batch for statement `name` (prepared on first use); an
            outcome's claim is written first, as the journal does."""
            with_claim, outcome = BATCHES[name]
            outcomes = []
            if outcome is not None:
                claimed, request = _claimed(next(fresh), now)
                sql, args = journal_statement([claimed], [], INSTANCE)
                await connection.fetch(sql, *args)
                outcomes = [outcome(claimed, request)]
            claims = [_claimed(next(fresh), now)[0]] if with_claim else []
            sql, args = journal_statement(claims, outcomes, INSTANCE)
            if name not in statements:
                statements[name] = await connection.prepare(sql, name=name)
            return args

        for _ in range(SMALL):  # PostgreSQL picks a plan to cache after five runs
            for name in BATCHES:
                args = await batch(name)
                await statements[name].fetch(*args)
        await connection.execute(
            "INSERT INTO transactions (tx_key, mti, terminal, stan, tx_date, fingerprint,"
            " request, state, instance)"
            " SELECT 'grown-' || g, '0200', 'GROWN001', lpad(g::text, 6, '0'), current_date,"
            f" '\\x00', '{{}}', 'answered', 'plans-test' FROM generate_series(1, {GROWN}) g"
        )
        plans = []
        for name in BATCHES:
            args = await batch(name)
            statement = statements[name]
            literals = [  # EXPLAIN EXECUTE takes values written out, not parameters
                await connection.fetchval(f"SELECT quote_nullable($1::{kind.name}::text)", value)
                for kind, value in zip(statement.get_parameters(), args, strict=True)
            ]
            rows = await connection.fetch(f"EXPLAIN EXECUTE {name}({', '.join(literals)})")
            plans.append("\n".join(row[0] for row in rows))
        return plans
    finally:
        await connection.close()


def _claimed(n: int, now: datetime) -> tuple[Claim, Message]:
    request = financial(n, "PLANS001", when=now)
    return IDENTITY.claim(request, now), request


def _answered(claim: Claim, request: Message) -> Outcome:
    return outcome_of(claim, answer(request, "00"), state="answered", switch="a", link="a#1")


def _timed_out(claim: Claim, request: Message) -> Outcome:
    reversal = reversal_for(claim.fields, claim.mti, "0400", datetime.now(UTC))
    return outcome_of(claim, answer(request, "91"), state="timed_out", reversal=reversal)


# A batch of each statement: whether it has a claim, and the outcome it has, if any.
BATCHES: dict[str, tuple[bool, Callable[[Claim, Message], Outcome] | None]] = {
    "claim": (True, None),
    "answered": (False, _answered),
    "timed_out": (False, _timed_out),
    "claim_and_answered": (True, _answered),
    "claim_and_timed_out": (True, _timed_out),
}


async def test_the_journal_statements_use_the_key_index_on_a_grown_table(
    database: Database,
) -> None:
    plans = await trio.to_thread.run_sync(
        asyncio.run, _plans_on_a_grown_table(database.dsn, database.schema)
    )
    assert len(plans) == len(BATCHES)
    for (with_claim, outcome), plan in zip(BATCHES.values(), plans, strict=True):
        assert "Seq Scan on transactions" not in plan, plan
        if with_claim:
            assert "Conflict Arbiter Indexes: transactions_tx_key_key" in plan, plan
        if outcome is not None:  # the update finds its row by key, not by the open claims
            assert "Index Scan using transactions_tx_key_key on transactions t" in plan, plan
