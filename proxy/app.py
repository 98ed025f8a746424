"""Composition root: builds the services from a config and runs them in one nursery."""

from __future__ import annotations

import random

import trio

from proxy.config import Config
from proxy.forwarder import Forwarder
from proxy.pool import Pool
from proxy.server import Server


class App:
    """The whole proxy. `run` reports the terminal port once links have tried to connect."""

    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.pool = Pool(config.switches, config.health, config.routing, rng or random.Random())
        self.server = Server(config.listen, Forwarder(self.pool, config.routing.match_key))

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pool.run)
            port: int = await nursery.start(self.server.run)
            task_status.started(port)
