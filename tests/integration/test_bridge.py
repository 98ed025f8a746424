"""The asyncio loop the store runs inside trio: timers, threads and sockets wake it; a
cancelled trio caller cancels its coroutine; closing lets what is running finish."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import pytest
import trio
import trio.testing

from proxy.bridge import Bridge


async def test_timers_executor_threads_and_sockets_each_wake_the_loop(
    nursery: trio.Nursery,
) -> None:
    bridge = Bridge()
    nursery.start_soon(bridge.drive)

    async def timer() -> str:
        await asyncio.sleep(0.05)
        return "timer"

    async def thread() -> str:
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.05)
        return "thread"

    async def socket() -> bytes:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping\n")
            answer = await reader.readline()
            writer.close()
            await writer.wait_closed()
            return answer

    with trio.fail_after(5):
        assert await bridge.call(timer()) == "timer"
        assert await bridge.call(thread()) == "thread"
        assert await bridge.call(socket()) == b"ping\n"
        await bridge.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()


async def test_a_cancelled_caller_cancels_its_coroutine_and_waits_for_its_cleanup(
    nursery: trio.Nursery,
) -> None:
    bridge = Bridge()
    nursery.start_soon(bridge.drive)
    events: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            events.append("cancelled")
            await asyncio.sleep(0.01)  # cleanup that takes a moment
            events.append("cleaned up")

    with trio.move_on_after(0.05):
        await bridge.call(slow())
    assert events == ["cancelled", "cleaned up"]
    with trio.fail_after(5):
        await bridge.close()


async def test_closing_lets_what_runs_finish_and_tells_its_caller(nursery: trio.Nursery) -> None:
    bridge = Bridge()
    nursery.start_soon(bridge.drive)
    cleaned_up = trio.Event()
    told: list[str] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.05)  # closing waits for this
            cleaned_up.set()

    nursery.start_soon(_call_noting_error, bridge, stubborn(), told)
    await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(5):
        await bridge.close()
        await trio.testing.wait_all_tasks_blocked()
    assert cleaned_up.is_set()
    assert told == ["the store stopped before this call was done"]
    with pytest.raises(ConnectionError):
        await bridge.call(asyncio.sleep(0))


async def test_a_call_that_will_not_end_is_abandoned_after_the_grace(
    nursery: trio.Nursery,
) -> None:
    bridge = Bridge()
    nursery.start_soon(bridge.drive)
    told: list[str] = []

    async def deaf() -> None:
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue  # ignores every cancel

    nursery.start_soon(_call_noting_error, bridge, deaf(), told)
    await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(5):
        await bridge.close(grace=0.1)
        await trio.testing.wait_all_tasks_blocked()
    assert told == ["the store stopped before this call was done"]


async def _call_noting_error(
    bridge: Bridge, coroutine: Coroutine[Any, Any, None], told: list[str]
) -> None:
    try:
        await bridge.call(coroutine)
    except ConnectionError as error:
        told.append(str(error))
