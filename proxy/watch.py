"""Waiting for a condition on shared state, woken each time that state changes."""

from __future__ import annotations

from collections.abc import Callable

import trio


class Watch:
    """Call `changed()` after every change; `wait_until(condition)` returns once it holds."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._event.wait()
