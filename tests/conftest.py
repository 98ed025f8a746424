"""Shared test helpers: configs built in memory, and the proxy and switches on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from codec import FrameFormat, Message, load_spec
from fixtures.messages import financial
from fixtures.sim_switch import SimSwitch, SimSwitchOptions
from fixtures.terminal import Terminal
from proxy.app import App
from proxy.config import Config, parse_config
from proxy.upstream import Link

FAST_RECONNECT = {"initial_delay": 0.05, "max_delay": 0.2}
# One good echo brings a link up; echoes are otherwise rare enough to stay out of the way.
FAST_HEALTH = {"echo_interval": 5, "echo_timeout": 1, "rise_interval": 0.05, "rise": 1}


def proxy_config(
    switch_ports: Mapping[str, int],
    *,
    listen: Mapping[str, Any] | None = None,
    switch: Mapping[str, Any] | None = None,
    routing: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
    each: Mapping[str, Mapping[str, Any]] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """A config for a proxy on 127.0.0.1:0 in front of the given switches.

    `switch` applies to every switch, `each` to the switch it names.
    """
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0, **(listen or {})},
        "switches": [
            {
                "name": name,
                "host": "127.0.0.1",
                "port": port,
                "connections": 2,
                "timeout": 5,
                "reconnect": FAST_RECONNECT,
                **(switch or {}),
                **(each or {}).get(name, {}),
            }
            for name, port in switch_ports.items()
        ],
    }
    raw["health"] = {**FAST_HEALTH, **(health or {})}
    if routing is not None:
        raw["routing"] = dict(routing)
    return parse_config(raw, base_dir=base_dir or Path.cwd())


async def start_switch(nursery: trio.Nursery, **options: Any) -> SimSwitch:
    switch = SimSwitch(SimSwitchOptions(**options))
    await nursery.start(switch.run)
    return switch


async def start_proxy(
    nursery: trio.Nursery, config: Config, *, links_up: bool = True
) -> tuple[App, int]:
    """The proxy; with `links_up`, once every link has passed its first echoes."""
    app = App(config)
    port: int = await nursery.start(app.run)
    if links_up:
        with trio.fail_after(10):
            await app.pool.wait_until(lambda: all(link.is_up for link in all_links(app)))
    return app, port


def all_links(app: App) -> list[Link]:
    return [link for links in app.pool.links.values() for link in links]


async def proxy_with_one_switch(
    nursery: trio.Nursery,
    terminals: Terminals,
    *,
    listen: Mapping[str, Any] | None = None,
    switch: Mapping[str, Any] | None = None,
    **switch_options: Any,
) -> tuple[SimSwitch, App, Terminal]:
    """A simulated switch `alpha`, the proxy in front of it, and a terminal connected to it."""
    sim = await start_switch(nursery, **switch_options)
    app, port = await start_proxy(
        nursery, proxy_config({"alpha": sim.port}, listen=listen, switch=switch)
    )
    return sim, app, await terminals.connect(port)


async def pipeline(terminal: Terminal, requests: list[Message]) -> list[Message]:
    """Write every request in one go, then read as many answers (in whatever order)."""
    await terminal.stream.send_all(b"".join(terminal.frame(request) for request in requests))
    return [await terminal.receive() for _ in requests]


async def pipelined_sessions(
    terminals: Terminals, port: int, *, sessions: int, each: int
) -> dict[str, list[Message]]:
    """`sessions` terminals (TERM0000, TERM0001...) at once, each pipelining `each`
    purchases with STANs 1..each; the answers each terminal got, by terminal id."""
    answers: dict[str, list[Message]] = {}

    async def session(tid: str) -> None:
        terminal = await terminals.connect(port)
        answers[tid] = await pipeline(terminal, [financial(s, tid) for s in range(1, each + 1)])

    async with trio.open_nursery() as running:
        for n in range(sessions):
            running.start_soon(session, f"TERM{n:04d}")
    return answers


class Terminals:
    """Opens terminal connections for a test and closes them all when it ends."""

    def __init__(self) -> None:
        self.opened: list[Terminal] = []

    async def connect(
        self, port: int, framing: FrameFormat | None = None, spec: str = "default"
    ) -> Terminal:
        terminal = await Terminal.connect(
            "127.0.0.1", port, framing or FrameFormat(), load_spec(spec)
        )
        self.opened.append(terminal)
        return terminal

    def adopt(self, terminal: Terminal) -> Terminal:
        self.opened.append(terminal)
        return terminal


@pytest.fixture
async def terminals() -> AsyncIterator[Terminals]:
    opened = Terminals()
    yield opened
    for terminal in opened.opened:
        await terminal.aclose()
