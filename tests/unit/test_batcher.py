"""The store's group commit, without a database: what is written, dropped and retried."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from proxy.batcher import Batcher


class _BadItem(Exception):
    """A fault of one item's data (as asyncpg's DataError is for the journal)."""


class _Database:
    """A fake flush: records each batch; a gate holds writes; 'bad' items fail the batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = trio.Event()
        self.gate.set()

    async def flush(self, items: list[str]) -> list[str]:
        self.batches.append(items)
        await self.gate.wait()
        if "bad" in items:
            raise _BadItem("invalid byte sequence")
        return [f"ok:{item}" for item in items]


async def _hears_stopped(batcher: Batcher[str, str], heard: dict[str, float], item: str) -> None:
    """Submit `item` and expect the batcher to stop first; `heard`: how long that took."""
    started = trio.current_time()
    with pytest.raises(ConnectionError):
        await batcher.submit(item, started + 30)
    heard[item] = trio.current_time() - started


async def test_concurrent_submissions_share_one_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = _Database()
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=10, max_wait=0.001, flush_timeout=1)
    results: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)

        async def submit(item: str) -> None:
            results[item] = await batcher.submit(item, trio.current_time() + 5)

        async with trio.open_nursery() as submitters:
            for n in range(25):
                submitters.start_soon(submit, f"i{n}")
        nursery.cancel_scope.cancel()
    assert results == {f"i{n}": f"ok:i{n}" for n in range(25)}
    assert [len(batch) for batch in db.batches] == [10, 10, 5]


async def test_without_a_wait_what_queues_during_a_write_goes_in_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Group commit with `max_wait` 0: a lone claim is written at once; those that came
    while it was being written share the next write."""
    db = _Database()
    db.gate = trio.Event()  # the first write holds until released
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=10, max_wait=0, flush_timeout=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        nursery.start_soon(batcher.submit, "first", trio.current_time() + 5)
        await trio.testing.wait_all_tasks_blocked()
        assert db.batches == [["first"]]  # not held back waiting for company
        for n in range(5):
            nursery.start_soon(batcher.submit, f"later{n}", trio.current_time() + 5)
        await trio.testing.wait_all_tasks_blocked()
        db.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [sorted(batch) for batch in db.batches] == [["first"], [f"later{n}" for n in range(5)]]


async def test_one_bad_item_does_not_fail_its_neighbours(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = _Database()
    batcher: Batcher[str, str] = Batcher(
        db.flush, max_size=10, max_wait=0.01, flush_timeout=1, item_errors=(_BadItem,)
    )
    outcomes: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)

        async def submit(item: str) -> None:
            try:
                outcomes[item] = await batcher.submit(item, trio.current_time() + 5)
            except _BadItem:
                outcomes[item] = "refused"

        async with trio.open_nursery() as submitters:
            for item in ("a", "bad", "c"):
                submitters.start_soon(submit, item)
        nursery.cancel_scope.cancel()
    assert outcomes == {"a": "ok:a", "bad": "refused", "c": "ok:c"}
    assert sorted(db.batches[0]) == ["a", "bad", "c"]  # one write, then one by one
    assert sorted(map(tuple, db.batches[1:])) == [("a",), ("bad",), ("c",)]


async def test_a_submission_given_up_while_queued_is_never_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = _Database()
    db.gate = trio.Event()  # the first write hangs for a while
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=1, max_wait=0.001, flush_timeout=10)
    outcomes: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)

        async def submit(item: str, wait: float) -> None:
            try:
                outcomes[item] = await batcher.submit(item, trio.current_time() + wait)
            except trio.TooSlowError:
                outcomes[item] = "gave up"

        async with trio.open_nursery() as submitters:
            submitters.start_soon(submit, "first", 1.0)  # taken into the hung write
            await trio.testing.wait_all_tasks_blocked()
            submitters.start_soon(submit, "second", 1.0)  # still queued at its deadline
            await trio.sleep(3)
            db.gate.set()
        nursery.cancel_scope.cancel()
    # The first was being written: its caller waited for the truth past its deadline.
    # The second was dropped at its deadline: its caller knows it was never written.
    assert outcomes == {"first": "ok:first", "second": "gave up"}
    assert db.batches == [["first"]]


async def test_a_hung_write_is_cut_at_the_flush_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = _Database()
    db.gate = trio.Event()  # never opens
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=1, max_wait=0.001, flush_timeout=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        started = trio.current_time()
        with pytest.raises(TimeoutError):
            await batcher.submit("x", trio.current_time() + 0.5)
        assert trio.current_time() - started == pytest.approx(2.0)
        nursery.cancel_scope.cancel()


async def test_stopping_settles_what_is_being_written_gathered_or_queued_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store stopping cancels its batchers: every caller hears of it at once (a
    ConnectionError, the store's 'unavailable'), not after its own timeout."""
    db = _Database()
    db.gate = trio.Event()  # the first write hangs
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=2, max_wait=0, flush_timeout=60)
    heard: dict[str, float] = {}
    submit = partial(_hears_stopped, batcher, heard)

    async with trio.open_nursery() as nursery, trio.open_nursery() as running:
        running.start_soon(batcher.run)
        nursery.start_soon(submit, "writing")
        await trio.testing.wait_all_tasks_blocked()
        for item in ("queued-1", "queued-2", "queued-3"):
            nursery.start_soon(submit, item)
        await trio.testing.wait_all_tasks_blocked()
        running.cancel_scope.cancel()  # the store stops
    assert heard == {"writing": 0, "queued-1": 0, "queued-2": 0, "queued-3": 0}
    assert db.batches == [["writing"]]


async def test_a_submission_after_the_batcher_stopped_fails_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batcher: Batcher[str, str] = Batcher(_Database().flush, max_size=2, max_wait=0, flush_timeout=1)
    with trio.move_on_after(1):
        await batcher.run()  # runs until stopped
    started = trio.current_time()
    with pytest.raises(ConnectionError):
        await batcher.submit("late", started + 30)
    assert trio.current_time() == started


async def test_a_queued_submission_hears_at_its_own_deadline_behind_a_hung_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The batcher keeps the deadlines of what waits in its queue: each caller hears at
    its own deadline (earlier ones first), while the write before them still hangs."""
    db = _Database()
    db.gate = trio.Event()
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=1, max_wait=0, flush_timeout=60)
    heard: dict[str, float] = {}

    async def submit(item: str, wait: float) -> None:
        started = trio.current_time()
        try:
            await batcher.submit(item, started + wait)
        except trio.TooSlowError:
            heard[item] = trio.current_time() - started

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        nursery.start_soon(submit, "writing", 1.0)
        await trio.testing.wait_all_tasks_blocked()
        for item, wait in (("late", 3.0), ("early", 0.5), ("middle", 2.0)):
            nursery.start_soon(submit, item, wait)
        await trio.sleep(10)
        db.gate.set()
        nursery.cancel_scope.cancel()
    assert heard == {"early": 0.5, "middle": 2.0, "late": 3.0}
    assert db.batches == [["writing"]]


async def test_what_queues_behind_a_hung_write_is_written_in_the_order_it_came(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = _Database()
    db.gate = trio.Event()
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=2, max_wait=0, flush_timeout=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        async with trio.open_nursery() as submitters:
            for n in range(9):
                submitters.start_soon(batcher.submit, f"{n}", trio.current_time() + 100)
                await trio.testing.wait_all_tasks_blocked()  # each queued before the next
            db.gate.set()
        nursery.cancel_scope.cancel()
    assert db.batches == [["0"], ["1", "2"], ["3", "4"], ["5", "6"], ["7", "8"]]


async def test_a_batcher_stopped_while_gathering_settles_what_it_gathered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With `max_wait`, a batch gathers for a while: the store stopping then must still
    tell its callers at once (they have no deadline of their own to end the wait)."""
    db = _Database()
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=10, max_wait=1, flush_timeout=5)
    heard: dict[str, float] = {}
    submit = partial(_hears_stopped, batcher, heard)

    async with trio.open_nursery() as nursery, trio.open_nursery() as running:
        running.start_soon(batcher.run)
        nursery.start_soon(submit, "gathered")
        await trio.sleep(0.5)  # mid-gather
        running.cancel_scope.cancel()
    assert heard == {"gathered": 0.5}
    assert db.batches == []


async def test_a_submission_late_when_its_batch_is_taken_is_never_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`max_wait` gathers past a deadline: the late one is left out, its caller told."""
    db = _Database()
    batcher: Batcher[str, str] = Batcher(db.flush, max_size=10, max_wait=1, flush_timeout=5)
    outcomes: dict[str, str] = {}

    async def submit(item: str, wait: float) -> None:
        try:
            outcomes[item] = await batcher.submit(item, trio.current_time() + wait)
        except trio.TooSlowError:
            outcomes[item] = f"too slow at {trio.current_time():g}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        async with trio.open_nursery() as submitters:
            submitters.start_soon(submit, "hurried", 0.1)
            submitters.start_soon(submit, "patient", 30)
        nursery.cancel_scope.cancel()
    assert outcomes == {"hurried": "too slow at 0.1", "patient": "ok:patient"}
    assert db.batches == [["patient"]]
