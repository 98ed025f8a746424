"""How each balancing strategy spreads real traffic over simulated switches."""

from __future__ import annotations

from typing import Any

import trio

from fixtures.messages import financial
from fixtures.sim_switch import SimSwitch
from tests.conftest import Terminals, proxy_config, start_proxy, start_switch


async def _traffic(port: int, terminals: Terminals, *, sessions: int, each: int) -> int:
    """Closed loop: each terminal sends its next request when the last is answered."""
    approved = 0

    async def session(n: int) -> None:
        nonlocal approved
        terminal = await terminals.connect(port)
        for stan in range(1, each + 1):
            answer = await terminal.request(financial(stan, f"T{n:07d}"))
            approved += answer.get("39") == "00"

    async with trio.open_nursery() as running:
        for n in range(sessions):
            running.start_soon(session, n)
    return approved


async def _two_switches(
    nursery: trio.Nursery, routing: dict[str, Any], weights: tuple[int, int], **alpha: Any
) -> tuple[SimSwitch, SimSwitch, int]:
    first = await start_switch(nursery, **alpha)
    second = await start_switch(nursery)
    config = proxy_config(
        {"alpha": first.port, "beta": second.port},
        routing=routing,
        each={"alpha": {"weight": weights[0]}, "beta": {"weight": weights[1]}},
    )
    _, port = await start_proxy(nursery, config)
    return first, second, port


async def test_round_robin_splits_evenly(nursery: trio.Nursery, terminals: Terminals) -> None:
    alpha, beta, port = await _two_switches(nursery, {"strategy": "round_robin"}, (1, 1))
    assert await _traffic(port, terminals, sessions=10, each=100) == 1000
    assert abs(alpha.financial_total() - 500) <= 50
    assert abs(beta.financial_total() - 500) <= 50


async def test_weighted_follows_the_weights(nursery: trio.Nursery, terminals: Terminals) -> None:
    alpha, beta, port = await _two_switches(nursery, {"strategy": "weighted"}, (3, 1))
    assert await _traffic(port, terminals, sessions=10, each=100) == 1000
    assert abs(alpha.financial_total() - 750) <= 75
    assert abs(beta.financial_total() - 250) <= 25


async def test_least_latency_avoids_a_slow_switch(
    nursery: trio.Nursery, terminals: Terminals
) -> None:
    slow, fast, port = await _two_switches(
        nursery, {"strategy": "least_latency"}, (1, 1), delay=0.02
    )
    assert await _traffic(port, terminals, sessions=8, each=50) == 400
    assert slow.financial_total() + fast.financial_total() == 400
    assert slow.financial_total() < 400 * 0.25  # clearly less than its even share of 50%
