"""Deadlines for many waiters, kept by one timer.

A cancel scope a waiter, the usual trio way to bound a wait, costs about ten microseconds
to enter and leave, and a transaction had several (BENCHMARKS.md). Where many tasks wait
for something that almost always comes in time (a journal write, a switch's answer),
`Deadlines` keeps their deadlines in a dict and one task sleeps until the earliest: adding
and removing a waiter is a dict operation, and the timer wakes about once per deadline
period while nothing is late. When something is late, `expired(item)` says so, and the
waiter's own code (woken by it) decides what that means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)

# How often, at most, the timer wakes: thousands of waiters behind a stalled database or
# switch are scanned that often, not once per waiter. Also how late a deadline may be told.
STEP = 0.01


class Deadlines(Generic[K]):
    """Items and their deadlines; `run` calls `expired(item)` once for each item still
    registered when its deadline passes (and forgets it)."""

    def __init__(self, expired: Callable[[K], None]) -> None:
        self._expired = expired
        self._items: dict[K, float] = {}
        self._timer: trio.CancelScope | None = None

    def add(self, item: K, deadline: float) -> None:
        self._items[item] = deadline
        timer = self._timer
        if timer is not None and deadline < timer.deadline:  # the earliest now: sooner
            timer.deadline = min(timer.deadline, max(deadline, trio.current_time() + STEP))

    def discard(self, item: K) -> None:
        self._items.pop(item, None)

    async def run(self) -> None:
        """Keep the deadlines until cancelled."""
        earliest = min(self._items.values(), default=math.inf)
        while True:
            with trio.CancelScope(deadline=max(earliest, trio.current_time() + STEP)) as timer:
                self._timer = timer
                await trio.sleep_forever()
            now = trio.current_time()
            late, earliest = [], math.inf  # one pass: who is late, and the next deadline
            for item, deadline in self._items.items():
                if deadline <= now:
                    late.append(item)
                elif deadline < earliest:
                    earliest = deadline
            for item in late:
                del self._items[item]
                self._expired(item)
