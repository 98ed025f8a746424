"""Journal write throughput: group-committed claims against one claim per round trip.

    python -m bench.store [--dsn DSN] [--rows N] [--concurrency C]

Both runs use the real store (the asyncio bridge, the claim statement) on a fresh schema
of the given database, dropped afterwards; the single-row run is the same store with
batch_max 1. Prints rows/s for each and the ratio; exits 1 if batching is not at least
5x faster (the target).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from bench.cast import sql
from fixtures.messages import financial
from proxy.store import Store, StoreSettings
from proxy.transactions import TransactionIdentity

TARGET_RATIO = 5.0
KEY_FIELDS = ("32", "41", "11", "37", "7")


@dataclass(frozen=True)
class Result:
    name: str
    rows: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


async def _claims(
    dsn: str, schema: str, name: str, batch_max: int, rows: int, tasks: int
) -> Result:
    settings = StoreSettings(dsn, schema, 30.0, 8, batch_max, 0.001, f"bench-{name}")
    store = Store(settings)
    identity = TransactionIdentity(KEY_FIELDS, b"bench-key")
    now = datetime.now(UTC)
    claims = [identity.claim(financial(n % 1_000_000, f"B{name[0]}{n // 1_000_000:06d}"), now)
              for n in range(rows)]  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.wait_ready()
        started = trio.current_time()

        async def worker(offset: int) -> None:
            for claim in claims[offset::tasks]:
                assert await store.claim(claim) is None

        async with trio.open_nursery() as workers:
            for offset in range(tasks):
                workers.start_soon(worker, offset)
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    return Result(name, rows, elapsed)


async def _main(dsn: str, rows: int, tasks: int) -> int:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        batched = await _claims(dsn, schema, "batched", 256, rows, tasks)
        single = await _claims(dsn, schema, "single", 1, rows, tasks)
    finally:
        await sql(dsn, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    ratio = batched.rate / single.rate
    print(f"{'path':<10}{'rows':>8}{'seconds':>10}{'rows/s':>12}")
    for result in (batched, single):
        print(f"{result.name:<10}{result.rows:>8}{result.seconds:>10.2f}{result.rate:>12.0f}")
    print(f"batched / single = {ratio:.1f}x (target >= {TARGET_RATIO:g}x), {tasks} claimers")
    return 0 if ratio >= TARGET_RATIO else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument(
        "--dsn", default=os.environ.get("ISO_PROXY_TEST_DSN") or os.environ.get("ISO_PROXY_DSN")
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error("no database: pass --dsn or set ISO_PROXY_TEST_DSN / ISO_PROXY_DSN")
    return trio.run(_main, args.dsn, args.rows, args.concurrency)


if __name__ == "__main__":
    sys.exit(main())
