"""The CPU regression check (issue 8): the proxy's CPU per transaction at saturation stays
within 30% of the figure recorded in bench/baseline.json (re-record it with
`python -m bench.regression --record` when a change makes the proxy faster)."""

from __future__ import annotations

import trio

from bench.regression import TOLERANCE, proxy_cpu_per_transaction, recorded
from tests.conftest import journal_dsn


async def test_proxy_cpu_per_transaction_has_not_regressed() -> None:
    with trio.fail_after(50):
        found = await proxy_cpu_per_transaction(journal_dsn())
    figure = found["proxy_cpu_us_per_txn"]
    assert figure <= recorded() * TOLERANCE, (
        f"proxy CPU {figure} us/txn (runs {found['runs']}) is more than "
        f"{TOLERANCE - 1:.0%} above the recorded {recorded()} us/txn"
    )
