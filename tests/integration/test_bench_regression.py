"""The CPU regression check (issue 8): the proxy's CPU per transaction at saturation stays
within 30% of the figure recorded in bench/baseline.json (re-record it with
`python -m bench.regression --record` when a change makes the proxy faster)."""

from __future__ import annotations

import pytest
import trio

from bench.regression import TOLERANCE, check, recorded
from tests.conftest import journal_dsn


@pytest.mark.timeout(150)  # up to three measurements of about 15 s each
async def test_proxy_cpu_per_transaction_has_not_regressed() -> None:
    with trio.fail_after(140):
        ok, found = await check(journal_dsn())
    figures = [f["proxy_cpu_us_per_txn"] for f in found]
    assert ok, (
        f"proxy CPU {figures} us/txn (each the lowest of its runs) is more than "
        f"{TOLERANCE - 1:.0%} above the recorded {recorded()} us/txn, every time"
    )
