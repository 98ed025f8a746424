"""Shared test helpers: configs built in memory, and the proxy and switches on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from codec import FrameFormat, load_spec
from fixtures.sim_switch import SimSwitch, SimSwitchOptions
from fixtures.terminal import Terminal
from proxy.app import App
from proxy.config import Config, parse_config

FAST_RECONNECT = {"initial_delay": 0.05, "max_delay": 0.2}


def proxy_config(
    switch_ports: Mapping[str, int],
    *,
    listen: Mapping[str, Any] | None = None,
    switch: Mapping[str, Any] | None = None,
    routing: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """A config for a proxy on 127.0.0.1:0 in front of the given switches."""
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
            }
            for name, port in switch_ports.items()
        ],
    }
    if routing is not None:
        raw["routing"] = dict(routing)
    return parse_config(raw, base_dir=base_dir or Path.cwd())


async def start_switch(nursery: trio.Nursery, **options: Any) -> SimSwitch:
    switch = SimSwitch(SimSwitchOptions(**options))
    await nursery.start(switch.run)
    return switch


async def start_proxy(nursery: trio.Nursery, config: Config) -> tuple[App, int]:
    app = App(config)
    port: int = await nursery.start(app.run)
    return app, port


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
