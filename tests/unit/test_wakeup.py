"""The one-waiter wake-up the hot path waits on (`proxy.wakeup`)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from proxy.wakeup import Wakeup


async def test_the_waiter_wakes_when_it_is_set() -> None:
    wakeup = Wakeup()
    woke = trio.Event()

    async def waiter() -> None:
        await wakeup.wait()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        wakeup.set()
        wakeup.set()  # again: nothing more
    assert woke.is_set() and wakeup.is_set()


async def test_waiting_once_set_is_a_checkpoint_and_returns() -> None:
    wakeup = Wakeup()
    wakeup.set()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await wakeup.wait()  # a checkpoint, as trio.Event's wait is
    await wakeup.wait()


async def test_a_cancelled_waiter_is_not_woken_later_and_another_may_wait() -> None:
    wakeup = Wakeup()
    with trio.move_on_after(0.01) as scope:
        await wakeup.wait()
    assert scope.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wakeup.wait)  # the cancelled one left: a new one may wait
        await trio.testing.wait_all_tasks_blocked()
        wakeup.set()


async def test_a_second_waiter_is_refused() -> None:
    wakeup = Wakeup()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wakeup.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="one waiter"):
            await wakeup.wait()
        wakeup.set()
