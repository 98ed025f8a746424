"""`proxy.deadlines`: one timer for many waiters' deadlines (virtual time)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from proxy.deadlines import STEP, Deadlines


class _Recorder:
    def __init__(self) -> None:
        self.when: dict[str, float] = {}

    def expired(self, item: str) -> None:
        assert item not in self.when, "told twice"
        self.when[item] = trio.current_time()


@asynccontextmanager
async def _running() -> AsyncIterator[tuple[Deadlines[str], _Recorder]]:
    """A running timer and what it told; stopped when the block ends."""
    recorder = _Recorder()
    deadlines: Deadlines[str] = Deadlines(recorder.expired)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deadlines.run)
        await trio.testing.wait_all_tasks_blocked()
        yield deadlines, recorder
        nursery.cancel_scope.cancel()


async def test_each_item_is_told_once_at_its_own_deadline_unless_discarded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _running() as (deadlines, recorder):
        for item, deadline in (("late", 3.0), ("early", 0.5), ("answered", 1.0), ("mid", 2.0)):
            deadlines.add(item, deadline)
        await trio.sleep(0.9)
        deadlines.discard("answered")  # came in time: never told
        await trio.sleep(10)
    assert recorder.when == {"early": 0.5, "mid": 2.0, "late": 3.0}


async def test_an_earlier_deadline_added_later_still_comes_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _running() as (deadlines, recorder):
        deadlines.add("far", 100.0)
        await trio.sleep(1)  # the timer sleeps until 100
        deadlines.add("near", 1.5)
        deadlines.add("overdue", 0.0)  # already past: told within one step
        await trio.sleep(200)
    assert recorder.when == {"overdue": pytest.approx(1 + STEP), "near": 1.5, "far": 100.0}


async def test_thousands_of_close_deadlines_wake_the_timer_once_a_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Behind a stalled database or switch, each waiter's deadline passes a moment after
    the last: the timer wakes at most once a step, not once a waiter."""
    due = {f"waiter-{n}": 1.0 + n * 0.0001 for n in range(5000)}  # 0.5 s of them, 0.1 ms apart
    async with _running() as (deadlines, recorder):
        for item, deadline in due.items():
            deadlines.add(item, deadline)
        await trio.sleep(5)
    assert recorder.when.keys() == due.keys()
    assert len(set(recorder.when.values())) <= 0.5 / STEP + 2  # wakes
    assert all(0 <= recorder.when[item] - due[item] <= STEP + 1e-9 for item in due)
