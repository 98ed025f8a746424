"""The CPU regression check (issue 8): the proxy's CPU per transaction at saturation,
relative to the simulated switch's when the same load goes straight at it (interleaved,
in the same run), stays within 30% of the ratio recorded in bench/baseline.json
(re-record it with `python -m bench.regression --record` when a change makes the proxy
faster, and after any change to the simulated switch, the yardstick: the check refuses a
baseline recorded with another)."""

from __future__ import annotations

import pytest
import trio

from bench.regression import TOLERANCE, check, describe, recorded
from tests.conftest import journal_dsn


@pytest.mark.timeout(300)  # up to ATTEMPTS (5) measurements of 15-25 s each
async def test_proxy_cpu_per_transaction_has_not_regressed() -> None:
    with trio.fail_after(290):
        ok, found = await check(journal_dsn())
    assert ok, (
        f"{describe(found)}: more than {TOLERANCE - 1:.0%} above the recorded ratio "
        f"{recorded()}, every time"
    )
