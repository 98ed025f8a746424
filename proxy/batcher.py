"""Group commit: concurrent submissions gathered and written with one call."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

from proxy.bridge import Stopped
from proxy.deadlines import Deadlines

I = TypeVar("I")  # noqa: E741 - item type of a batch
R = TypeVar("R")


class _Slot(Generic[R]):
    __slots__ = ("abandoned", "deadline", "done", "error", "result", "taken")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # to be taken into a write by then, or dropped
        self.done = trio.Event()
        self.taken = False  # in a write under way: its outcome is no longer ours to drop
        self.abandoned = False  # dropped while still queued (late, or its caller gave up)
        self.result: R | None = None
        self.error: BaseException | None = None


class Batcher(Generic[I, R]):
    """Gathers concurrent submissions and writes each gathering with one `flush` call.

    A submission not taken into a write by its deadline, or whose caller gives up while it
    is still queued, is dropped, never written (a late one's caller gets TooSlowError). The batcher
    keeps those deadlines itself, one timer for its whole queue (`proxy.deadlines`), rather
    than each caller a cancel scope of its own: a scope per journal stage cost the proxy
    about 5 % of its CPU. The queue holds only callers still waiting, each until its
    deadline at most, and they are taken in the order they came. One already being written is waited
    for (the write is bounded by `flush_timeout`), so the caller always learns what the
    database really holds. If a batch fails with one of `item_errors` (a fault of its data,
    not of the connection), its items are written one by one, so one bad item cannot fail
    its neighbours.
    """

    def __init__(
        self,
        flush: Callable[[list[I]], Awaitable[list[R]]],
        max_size: int,
        max_wait: float,
        flush_timeout: float,
        item_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        self._flush = flush
        self._max_size = max_size
        self._max_wait = max_wait
        self._flush_timeout = flush_timeout
        self._item_errors = item_errors  # a batch failing so is written again item by item
        self._queue: deque[tuple[I, _Slot[R]]] = deque()
        self._arrived = trio.Event()  # something was queued since the batcher last looked
        self._deadlines: Deadlines[_Slot[R]] = Deadlines(self._late)
        self._stopped = False

    async def submit(self, item: I, deadline: float) -> R:
        """The write's result; TooSlowError when it was not taken into a write by
        `deadline`; ConnectionError when the batcher has stopped."""
        if self._stopped:
            raise Stopped("the store stopped before this write")
        slot: _Slot[R] = _Slot(deadline)
        try:
            self._queue.append((item, slot))
            self._deadlines.add(slot, deadline)
            self._arrived.set()
            await slot.done.wait()
        finally:
            if not slot.done.is_set() and not slot.taken:
                slot.abandoned = True  # given up while queued: never written
                self._deadlines.discard(slot)
        if slot.error is not None:  # one error for a whole batch: a fresh traceback each
            raise slot.error.with_traceback(None)
        return slot.result  # type: ignore[return-value]

    async def run(self) -> None:
        batch: list[tuple[I, _Slot[R]]] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire)
                while True:
                    await self._gathered()
                    batch = self._take()  # from here to the write, no checkpoint
                    if batch:
                        await self._write(batch)
                    batch = []
        finally:
            self._stop(batch)

    def _stop(self, batch: Sequence[tuple[I, _Slot[R]]] = ()) -> None:
        """Stopped: what was gathered or is still queued is never written, and its callers
        hear so at once; later submissions fail at once."""
        self._stopped = True
        for _, slot in [*batch, *self._queue]:
            if not slot.done.is_set():
                _settle(slot, error=Stopped("the store stopped before this write"))
        self._queue.clear()

    async def _gathered(self) -> None:
        """Wait until something is queued; with `max_wait`, until `max_size` are, or
        `max_wait` has passed. What is gathered stays queued (and its deadlines kept)."""
        while not self._queue:
            self._arrived = trio.Event()
            await self._arrived.wait()
        if self._max_wait:
            with trio.move_on_after(self._max_wait):
                while len(self._queue) < self._max_size:
                    self._arrived = trio.Event()
                    await self._arrived.wait()

    def _take(self) -> list[tuple[I, _Slot[R]]]:
        """The next batch: up to `max_size` of the queue, in order, leaving out whoever
        gave up and whoever is already late (the expiry timer may not have run yet)."""
        now = trio.current_time()
        batch: list[tuple[I, _Slot[R]]] = []
        queue = self._queue
        while queue and len(batch) < self._max_size:
            item, slot = queue.popleft()
            if slot.abandoned:
                continue
            self._deadlines.discard(slot)
            if slot.deadline <= now:
                self._late(slot)
                continue
            slot.taken = True
            batch.append((item, slot))
        return batch

    def _late(self, slot: _Slot[R]) -> None:
        """A queued submission's deadline passed: dropped, its caller told."""
        slot.abandoned = True
        _settle(slot, error=trio.TooSlowError())

    async def _expire(self) -> None:
        try:
            await self._deadlines.run()
        finally:  # the store is stopping: the queued hear it now, not after the write
            self._stop()

    async def _write(self, batch: list[tuple[I, _Slot[R]]]) -> None:
        try:
            await self._write_settled(batch)
        finally:  # cancelled (the store is stopping): no caller is left waiting for ever
            for _, slot in batch:
                if not slot.done.is_set():
                    _settle(slot, error=Stopped("the store stopped during this write"))

    async def _write_settled(self, batch: list[tuple[I, _Slot[R]]]) -> None:
        try:
            results = await self._bounded_flush([item for item, _ in batch])
        except self._item_errors as error:
            if len(batch) == 1:
                _settle(batch[0][1], error=error)
                return
            for one in batch:
                await self._write([one])
            return
        except Exception as error:  # delivered to every waiter of the batch
            for _, slot in batch:
                _settle(slot, error=error)
            return
        for (_, slot), result in zip(batch, results, strict=True):
            _settle(slot, result=result)

    async def _bounded_flush(self, items: list[I]) -> list[R]:
        with trio.move_on_after(self._flush_timeout):
            return await self._flush(items)
        raise TimeoutError(f"write slower than {self._flush_timeout:g} s")


def _settle(slot: _Slot[R], *, result: R | None = None, error: BaseException | None = None) -> None:
    slot.result = result
    slot.error = error
    slot.done.set()
