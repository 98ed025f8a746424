"""A one-shot wake-up for a single waiting task: `trio.Event` without its parking lot.

Every transaction waits three times on the hot path (its claim's write, the switch's
answer, its outcome's write), each for one event that only its own task waits on and
that is set once. `trio.Event` serves any number of waiters through a parking lot; making,
waiting on and setting one costs about ten Python calls more than this does.
"""

from __future__ import annotations

import trio


class Wakeup:
    """Set once, by anyone; waited on by one task at a time. Waiting is a checkpoint, as
    `trio.Event.wait` is: cancellable while unset, a yield when already set."""

    __slots__ = ("_set", "_task")

    def __init__(self) -> None:
        self._set = False
        self._task: trio.lowlevel.Task | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Set it, and wake its waiter if one is waiting; again: nothing more."""
        if self._set:
            return
        self._set = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Return once it is set. RuntimeError if another task is waiting already."""
        if self._set:
            await trio.lowlevel.checkpoint()
            return
        if self._task is not None:
            raise RuntimeError("a Wakeup has one waiter at a time")
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._task = None  # cancelled: a later `set` wakes no one
        return trio.lowlevel.Abort.SUCCEEDED
