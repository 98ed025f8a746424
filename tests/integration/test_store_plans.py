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
from proxy.store import _CLAIM, _COMPLETE, _migrate, claim_args, outcome_args, session_settings
from proxy.transactions import Claim, Outcome, TransactionIdentity, outcome_of
from tests.conftest import Database

IDENTITY = TransactionIdentity(("32", "41", "11", "37", "7"), b"plans-test-key")
SMALL, GROWN = 10, 20_000


async def _plans_on_a_grown_table(dsn: str, schema: str) -> list[str]:
    """Run the claim and outcome statements, each prepared once, as the journal's session
    does: a few times on a small table, then explain them once the table has grown."""
    connection = await asyncpg.connect(dsn, server_settings=session_settings(schema))
    try:
        await _migrate(connection, schema)
        claim = await connection.prepare(_CLAIM, name="claim")
        complete = await connection.prepare(_COMPLETE, name="complete")
        now = datetime.now(UTC)
        for n in range(SMALL):  # PostgreSQL picks a plan to cache after five runs
            request = financial(n, "PLANS001", when=now)
            claimed = IDENTITY.claim(request, now)
            await claim.fetch(*claim_args([claimed], "plans-test"))
            await complete.fetch(*outcome_args([_answered(claimed, request)]))
        await connection.execute(
            "INSERT INTO transactions (tx_key, mti, terminal, stan, tx_date, fingerprint,"
            " request, state, instance)"
            " SELECT 'grown-' || g, '0200', 'GROWN001', lpad(g::text, 6, '0'), current_date,"
            f" '\\x00', '{{}}', 'answered', 'plans-test' FROM generate_series(1, {GROWN}) g"
        )
        request = financial(SMALL, "PLANS001", when=now)
        claimed = IDENTITY.claim(request, now)
        plans = []
        for statement, args in (
            (claim, claim_args([claimed], "plans-test")),
            (complete, outcome_args([_answered(claimed, request)])),
        ):
            literals = [  # EXPLAIN EXECUTE takes values written out, not parameters
                await connection.fetchval(f"SELECT quote_nullable($1::{kind.name}::text)", value)
                for kind, value in zip(statement.get_parameters(), args, strict=True)
            ]
            name = "claim" if statement is claim else "complete"
            rows = await connection.fetch(f"EXPLAIN EXECUTE {name}({', '.join(literals)})")
            plans.append("\n".join(row[0] for row in rows))
        return plans
    finally:
        await connection.close()


def _answered(claim: Claim, request: Message) -> Outcome:
    return outcome_of(claim, answer(request, "00"), state="answered", switch="a", link="a#1")


async def test_the_claim_and_outcome_statements_use_the_key_index_on_a_grown_table(
    database: Database,
) -> None:
    plans = await trio.to_thread.run_sync(
        asyncio.run, _plans_on_a_grown_table(database.dsn, database.schema)
    )
    for plan in plans:
        assert "Seq Scan on transactions" not in plan, plan
        assert "transactions_tx_key_key" in plan, plan
