"""An asyncio event loop run inside trio, in trio's own thread, a step at a time.

asyncpg speaks asyncio only. `Bridge` runs an asyncio loop as a trio task and hands it
coroutines; the trio side waits on an event, so the trio loop is never blocked, and
cancelling the trio caller cancels the asyncio task (which cancels a query). Only the
store uses it: nothing else in the proxy knows asyncio exists.
"""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

import trio

T = TypeVar("T")


# Steps the loop takes in a row while it has callbacks ready, before trio's tasks get a
# turn: a query's reply takes three (read it, resume the query, tell its caller), and a
# turn of trio's between them cost a scheduler pass each.
STEPS_IN_A_ROW = 3


class Stopped(ConnectionError):
    """The store is stopping: a call or a write it cut short (not a fault of the database)."""


class Bridge:
    """An asyncio event loop run by a trio task in trio's own thread, and a way for trio
    tasks to await coroutines on it.

    The loop is never left running: `drive` turns it one step at a time (`stop()` then
    `run_forever()`, asyncio's documented way to run one pass: I/O polled without waiting,
    the ready callbacks run) and between steps sleeps in trio until the loop has work: its
    selector's descriptor (an epoll or kqueue, itself pollable) turns readable, its next
    timer falls due, or a trio task hands it a coroutine. Callbacks therefore run inside a
    trio task, and a finished call wakes its trio caller directly. An earlier design gave
    the loop a thread of its own; the hand-offs between the threads, and their fight over
    the GIL, cost more CPU than the queries did (BENCHMARKS.md).
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._loop = asyncio.SelectorEventLoop(self._selector)
        self._idle: trio.CancelScope | None = None  # the driver's wait between steps
        self._closing = False  # every task cancelled: end once they have finished
        self._abandon = False  # end now, finished or not
        self._ended = trio.Event()
        self._waiting: set[trio.Event] = set()  # the calls' wake-ups, woken at the end

    async def drive(self) -> None:
        """Run the loop until `close` ends it. Cancellation does not stop it: what the
        store closes on its way out (the pool's connections) still needs the loop."""
        loop = self._loop
        fd = self._selector.fileno()
        try:
            with trio.CancelScope(shield=True):
                while not self._abandon:
                    pending = self._steps()
                    if self._closing and not pending and not asyncio.all_tasks(loop):
                        break
                    if pending:
                        await trio.lowlevel.checkpoint()
                        continue
                    with trio.CancelScope(deadline=self._next_timer()) as self._idle:
                        await trio.lowlevel.wait_readable(fd)
                    self._idle = None
        finally:
            trio.lowlevel.notify_closing(fd)
            loop.close()
            self._ended.set()
            for done in self._waiting:  # calls abandoned unfinished: their callers get an error
                done.set()

    def _steps(self) -> bool:
        """Up to STEPS_IN_A_ROW steps of the loop while it has callbacks ready; whether it
        has some still."""
        loop = self._loop
        for _ in range(STEPS_IN_A_ROW):
            loop.stop()
            loop.run_forever()  # one step
            if not loop._ready:  # type: ignore[attr-defined]  # the next step's callbacks
                return False
        return True

    def _next_timer(self) -> float:
        """When the loop's earliest timer falls due, on trio's clock."""
        scheduled = self._loop._scheduled  # type: ignore[attr-defined]
        if not scheduled:
            return math.inf
        when: float = scheduled[0].when()
        return trio.current_time() + when - self._loop.time()

    def _step_here(self) -> None:
        """When the driver sleeps until the loop's descriptor or next timer wakes it, take
        a new call's first steps (its query sent) in the caller's task, and wake the driver
        only if they leave it more to do than those will tell it (a scheduler pass a query
        fewer); else wake it to take them. If a step raises (nothing but a loop fault or a
        KeyboardInterrupt can), the driver is woken all the same."""
        idle = self._idle
        if idle is None or idle.cancel_called:
            return  # the driver is stepping, or about to: it takes the call's steps too
        try:
            if not self._steps() and self._next_timer() >= idle.deadline:
                return
        except BaseException:
            idle.cancel()
            raise
        idle.cancel()

    def _wake(self) -> None:
        if self._idle is not None:
            self._idle.cancel()

    async def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop. ConnectionError when the loop closed under it (the
        store is stopping); a cancelled caller cancels it, and waits briefly for it."""
        if self._closing:
            coroutine.close()
            raise Stopped("the store is closing")
        task = self._loop.create_task(coroutine)
        done = trio.Event()
        task.add_done_callback(lambda _: done.set())
        self._waiting.add(done)
        try:
            self._step_here()
            await done.wait()
        except BaseException:
            if not self._loop.is_closed():
                task.cancel()  # cancels the query
                self._wake()
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await done.wait()  # let it clean up (close what it opened)
            raise
        finally:
            self._waiting.discard(done)
        if not task.done() or task.cancelled():  # abandoned, or cancelled by `close`
            raise Stopped("the store stopped before this call was done")
        return task.result()

    async def close(self, grace: float = 5.0) -> None:
        """Cancel the loop's tasks, let them finish (for at most `grace` seconds), end
        `drive`; a call still unfinished then gets ConnectionError."""
        self._closing = True
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._wake()
        with trio.move_on_after(grace):
            await self._ended.wait()
        self._abandon = True
        self._wake()
        await self._ended.wait()
