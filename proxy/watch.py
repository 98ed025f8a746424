"""Waiting for a condition on shared state, woken each time that state changes."""

from __future__ import annotations

from collections.abc import Callable

import trio


class Watch:
    """Call `changed()` after every change; `wait_until(condition)` returns once it holds.

    The event is made only when someone waits: a change nobody waits for (most of them,
    on the hot path) costs an attribute test."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    def changed(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
