"""The journal's statements find rows by the transaction key's index however the table
grew: a plan PostgreSQL cached while the table was small scans it whole, and went on doing
so for every batch as it grew (the journal's connections plan each statement afresh)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import trio

from codec import Message
from fixtures.messages import financial
from proxy.responses import answer
from proxy.store import _CLAIM, _migrate, claim_args, outcome_statement, session_settings
from proxy.transactions import Claim, Outcome, TransactionIdentity, outcome_of, reversal_for
from tests.conftest import Database

IDENTITY = TransactionIdentity(("32", "41", "11", "37", "7"), b"plans-test-key")
SMALL, GROWN = 10, 20_000


async def _plans_on_a_grown_table(dsn: str, schema: str) -> list[str]:
    """Run the claim statement and both outcome statements (plain, and queueing a
    reversal), each prepared once, as the journal's session does: a few times on a small
    table, then explain them once the table has grown."""
    connection = await asyncpg.connect(dsn, server_settings=session_settings(schema))
    try:
        await _migrate(connection, schema)
        now = datetime.now(UTC)
        outcomes = (_answered, _timed_out)
        statements = {"claim": await connection.prepare(_CLAIM, name="claim")}
        for outcome in outcomes:
            sql, _ = outcome_statement([outcome(*_claimed(0, now))])
            statements[outcome.__name__] = await connection.prepare(sql, name=outcome.__name__)
        for n in range(SMALL):  # PostgreSQL picks a plan to cache after five runs
            for outcome in outcomes:
                claimed, request = _claimed(n * len(outcomes) + outcomes.index(outcome), now)
                await statements["claim"].fetch(*claim_args([claimed], "plans-test"))
                _, args = outcome_statement([outcome(claimed, request)])
                await statements[outcome.__name__].fetch(*args)
        await connection.execute(
            "INSERT INTO transactions (tx_key, mti, terminal, stan, tx_date, fingerprint,"
            " request, state, instance)"
            " SELECT 'grown-' || g, '0200', 'GROWN001', lpad(g::text, 6, '0'), current_date,"
            f" '\\x00', '{{}}', 'answered', 'plans-test' FROM generate_series(1, {GROWN}) g"
        )
        claimed, request = _claimed(SMALL * len(outcomes), now)
        runs = {"claim": claim_args([claimed], "plans-test")}
        for outcome in outcomes:
            runs[outcome.__name__] = outcome_statement([outcome(claimed, request)])[1]
        plans = []
        for name, args in runs.items():
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


async def test_the_claim_and_outcome_statements_use_the_key_index_on_a_grown_table(
    database: Database,
) -> None:
    plans = await trio.to_thread.run_sync(
        asyncio.run, _plans_on_a_grown_table(database.dsn, database.schema)
    )
    assert len(plans) == 3
    for plan in plans:
        assert "Seq Scan on transactions" not in plan, plan
        assert "transactions_tx_key_key" in plan, plan
