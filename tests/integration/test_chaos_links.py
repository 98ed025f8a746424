"""The switch side through the fault-injecting relay: slices, latency, resets."""

from __future__ import annotations

import trio

from fixtures.chaos import ChaosProxy
from fixtures.messages import financial
from proxy.app import App
from tests.conftest import Terminals, pipeline, proxy_config, start_proxy, start_switch


async def _behind_chaos(nursery: trio.Nursery, **switch: object) -> tuple[ChaosProxy, App, int]:
    sim = await start_switch(nursery)
    chaos = ChaosProxy(("127.0.0.1", sim.port), seed=8583)
    await nursery.start(chaos.run)
    app, port = await start_proxy(
        nursery, proxy_config({"alpha": chaos.port}, switch={"connections": 1, **switch})
    )
    return chaos, app, port


async def test_a_switch_stream_in_one_byte_slices_with_jitter_changes_nothing(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    chaos, _, port = await _behind_chaos(nursery)
    chaos.slice = 1
    chaos.latency, chaos.jitter = 0.001, 0.004
    terminal = await terminals.connect(port)
    answers = await pipeline(terminal, [financial(stan) for stan in range(1, 21)])
    assert sorted((a.get("11"), a.get("39")) for a in answers) == [
        (f"{stan:06d}", "00") for stan in range(1, 21)
    ]


async def test_a_reset_in_the_middle_of_a_request_fails_it_at_once_and_the_link_returns(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    chaos, app, port = await _behind_chaos(nursery, timeout=10)
    link = app.pool.links["alpha"][0]
    terminal = await terminals.connect(port)
    assert (await terminal.request(financial(1))).get("39") == "00"

    # The next connection passes its first echo (41 bytes), then resets 10 bytes into
    # the request that follows.
    chaos.reset_after = 41 + 10
    chaos.sever()
    with trio.fail_after(10):
        await app.pool.wait_until(lambda: link.connects == 2 and link.is_up)
    with trio.fail_after(3):  # at once, not at the 10 s deadline
        assert (await terminal.request(financial(2))).get("39") == "91"

    chaos.reset_after = None
    with trio.fail_after(10):
        await app.pool.wait_until(lambda: link.connects == 3 and link.is_up)
    assert (await terminal.request(financial(3))).get("39") == "00"
