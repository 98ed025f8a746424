"""Writes to a switch: frames that queue behind a write leave together, in one write, and a
frame that cannot start before its deadline never leaves (over in-memory streams, whose
writes the test can hold and count). Over TCP a write is held like this only while the
socket is full: otherwise each frame leaves at once (`proxy.streams.send_now`)."""

from __future__ import annotations

import random

import trio
import trio.testing

from codec import Message
from fixtures.messages import financial
from proxy.config import SwitchConfig
from proxy.errors import NotWritten, ProxyError
from proxy.keys import match_key
from proxy.pool import Pool
from proxy.upstream import MAX_BATCH_FRAMES
from tests.conftest import proxy_config
from tests.integration.test_health_clock import ScriptedSwitch


class HeldWrites(ScriptedSwitch):
    """A scripted switch whose connection counts the proxy's writes and, while `held`, keeps
    each write from finishing (its bytes stay queued on the way to the switch)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__(nursery)
        self.writes = 0
        self.held = False
        self.released = trio.Event()
        self.write_time = 0.0  # how long each write takes (a slow peer)

    async def dial(self, switch: SwitchConfig) -> trio.abc.Stream:
        proxy_end = await super().dial(switch)
        assert isinstance(proxy_end, trio.StapledStream)
        send_stream = proxy_end.send_stream
        assert isinstance(send_stream, trio.testing.MemorySendStream)
        deliver = send_stream.send_all_hook
        assert deliver is not None

        async def counted() -> None:
            self.writes += 1
            if self.held:
                await self.released.wait()
            await trio.sleep(self.write_time)
            await deliver()

        send_stream.send_all_hook = counted
        return proxy_end


async def _pool(nursery: trio.Nursery, switch: ScriptedSwitch) -> Pool:
    config = proxy_config({"alpha": 7001}, switch={"connections": 1})
    pool = Pool(config.switches, config.health, config.routing, random.Random(7), switch.dial)
    await nursery.start(pool.run)
    await pool.wait_until(lambda: pool.links["alpha"][0].is_up)
    return pool


async def _forward(pool: Pool, request: Message, outcomes: dict[str, str]) -> None:
    stan = request.get("11") or ""
    try:
        answer = (await pool.forward(request, match_key(request, ("41", "11")))).response
        outcomes[stan] = answer.get("39") or ""
    except ProxyError as error:
        outcomes[stan] = type(error).__name__


async def _burst_behind_a_held_write(
    nursery: trio.Nursery, requests: int
) -> tuple[HeldWrites, dict[str, str], int]:
    """`requests` forwarded at once while the first one's write is held, then released:
    the switch, each request's outcome, and the writes seen while the first was held."""
    switch = HeldWrites(nursery)
    pool = await _pool(nursery, switch)
    switch.held, switch.writes = True, 0
    outcomes: dict[str, str] = {}
    async with trio.open_nursery() as senders:
        for stan in range(1, requests + 1):
            senders.start_soon(_forward, pool, financial(stan), outcomes)
        await trio.testing.wait_all_tasks_blocked()
        while_held = switch.writes
        switch.released.set()
    return switch, outcomes, while_held


async def test_frames_queued_behind_a_write_leave_together_in_one_write(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch, outcomes, while_held = await _burst_behind_a_held_write(nursery, 10)
    assert while_held == 1  # the first frame's write is held; nine frames wait
    assert outcomes == {f"{stan:06d}": "00" for stan in range(1, 11)}
    assert switch.writes == 2  # the nine left in one write
    assert sorted(r.get("11") or "" for r in switch.transactions) == sorted(outcomes)


async def test_what_gathers_during_a_stall_leaves_in_writes_of_bounded_size(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch, outcomes, _ = await _burst_behind_a_held_write(nursery, 41)
    assert set(outcomes.values()) == {"00"} and len(outcomes) == 41
    # 40 frames in writes of at most MAX_BATCH_FRAMES each, after the first write.
    assert switch.writes == 1 + -(-40 // MAX_BATCH_FRAMES)


async def test_a_writer_writes_one_batch_not_everyone_s_while_traffic_keeps_coming(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = HeldWrites(nursery)
    pool = await _pool(nursery, switch)
    switch.write_time = 0.2  # a request comes every 0.15 s: there is always a batch waiting
    took: dict[str, float] = {}
    outcomes: dict[str, str] = {}

    async def timed(request: Message) -> None:
        started = trio.current_time()
        await _forward(pool, request, outcomes)
        took[request.get("11") or ""] = trio.current_time() - started

    async with trio.open_nursery() as requests:
        for stan in range(1, 21):
            requests.start_soon(timed, financial(stan))
            await trio.sleep(0.15)
    assert set(outcomes.values()) == {"00"}
    # Each request waits for at most the write before its own and its own (0.4 s), never
    # for the writes of everyone who came after it.
    assert max(took.values()) <= 0.45


async def test_a_frame_still_waiting_at_its_deadline_gives_up_unwritten(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = HeldWrites(nursery)
    pool = await _pool(nursery, switch)
    link = pool.links["alpha"][0]
    switch.held, switch.writes = True, 0
    claimed: list[str] = []
    refused: list[str] = []

    async def send(stan: int, within: float) -> None:
        try:
            await link.send(
                financial(stan),
                deadline=trio.current_time() + within,
                before_write=lambda _: claimed.append(f"{stan:06d}"),
            )
        except NotWritten:
            refused.append(f"{stan:06d}")

    async with trio.open_nursery() as senders:
        senders.start_soon(send, 1, 10.0)
        await trio.testing.wait_all_tasks_blocked()
        senders.start_soon(send, 2, 1.0)
        await trio.sleep(1.5)  # the second frame's deadline has passed; the write is held
        assert refused == ["000002"]
        switch.released.set()
    await trio.testing.wait_all_tasks_blocked()
    # Never claimed (so the pool may send it elsewhere) and never on the wire.
    assert claimed == ["000001"]
    assert [r.get("11") for r in switch.transactions] == ["000001"]
    assert switch.writes == 1


class StallsMidWrite(ScriptedSwitch):
    """A scripted switch that, once armed, takes the first frame of the next write of
    several frames and then stops reading (that write never ends)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__(nursery)
        self.frame_size = 0  # armed when set
        self.hold = trio.Event()  # the first write is held until this is set

    async def dial(self, switch: SwitchConfig) -> trio.abc.Stream:
        return _Stalling(await super().dial(switch), self)


class _Stalling(trio.abc.Stream):
    def __init__(self, inner: trio.abc.Stream, switch: StallsMidWrite) -> None:
        self.inner, self.switch = inner, switch

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        size = self.switch.frame_size
        if size and len(data) == size and not self.switch.hold.is_set():
            await self.switch.hold.wait()
        if size and len(data) >= 2 * size:
            await self.inner.send_all(data[:size])  # the first frame gets through whole
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_answer_that_came_before_the_rest_of_its_write_was_lost_stands(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    switch = StallsMidWrite(nursery)
    pool = await _pool(nursery, switch)
    link = pool.links["alpha"][0]
    switch.frame_size = len(link._frame(financial(1)))
    outcomes: dict[str, str] = {}
    async with trio.open_nursery() as requests:
        requests.start_soon(_forward, pool, financial(1), outcomes)  # written alone, held
        await trio.testing.wait_all_tasks_blocked()
        requests.start_soon(_forward, pool, financial(2), outcomes)  # these two leave in
        requests.start_soon(_forward, pool, financial(3), outcomes)  # one write, which stalls
        await trio.testing.wait_all_tasks_blocked()
        switch.hold.set()
    # The batch's first frame (2 or 3: trio picks the order) got through whole and was
    # approved: the approval stands, though the write it was part of was then lost. The
    # other frame may have reached the switch in part: LinkLost.
    through = switch.transactions[-1].get("11") or ""
    assert [r.get("11") for r in switch.transactions] == ["000001", through]
    cut = ({"000002", "000003"} - {through}).pop()
    assert outcomes == {"000001": "00", through: "00", cut: "LinkLost"}
