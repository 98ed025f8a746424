"""Shared test helpers: configs built in memory, and the proxy and switches on port 0."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from codec import FrameFormat, Message, load_spec
from fixtures.chaos import ChaosProxy, Mode
from fixtures.messages import financial
from fixtures.sim_switch import SimSwitch, SimSwitchOptions
from fixtures.terminal import Terminal
from proxy.app import App, Secrets
from proxy.config import Config, parse_config
from proxy.embedded import EmbeddedUnavailable, start_embedded
from proxy.forwarder import utc_now
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
    store: Mapping[str, Any] | None = None,
    idempotency: Mapping[str, Any] | None = None,
    reversal: Mapping[str, Any] | None = None,
    clients: Sequence[Mapping[str, Any]] | None = None,
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
    raw["admin"] = {"host": "127.0.0.1", "port": 0}
    raw["store"] = dict(store) if store is not None else {"enabled": False}
    if idempotency is not None:
        raw["idempotency"] = dict(idempotency)
    if reversal is not None:
        raw["reversal"] = dict(reversal)
    if routing is not None:
        raw["routing"] = dict(routing)
    if clients is not None:
        raw["clients"] = list(clients)
    return parse_config(raw, base_dir=base_dir or Path.cwd())


async def start_switch(nursery: trio.Nursery, **options: Any) -> SimSwitch:
    switch = SimSwitch(SimSwitchOptions(**options))
    await nursery.start(switch.run)
    return switch


TEST_PAN_KEY = b"test-pan-key-not-a-secret-0123456789"
TEST_ADMIN_TOKEN = "test-admin-token-not-a-secret"


class Watched(Protocol):
    async def wait_until(self, condition: Callable[[], bool]) -> None: ...


async def wait_any(watched: Sequence[Watched], condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, checked whenever any of `watched` changes (switches
    receiving, reversal workers recording...)."""
    async with trio.open_nursery() as waiting:
        for one in watched:

            async def wait(one: Watched = one) -> None:
                await one.wait_until(condition)
                waiting.cancel_scope.cancel()

            waiting.start_soon(wait)


async def http(
    port: int, path: str, method: str = "GET", token: str | None = None
) -> tuple[int, bytes]:
    """One request to 127.0.0.1:`port` (h11 on the client side too); status and body."""
    client = h11.Connection(h11.CLIENT)
    headers = [("host", "localhost"), ("content-length", "0")]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        request = h11.Request(method=method, target=path, headers=headers)
        await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, body


def metric_samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def nonzero_by(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, label: str
) -> dict[str, float]:
    """The samples of `name` that are not zero, by the value of their `label`."""
    return {
        dict(labels)[label]: value
        for (sample, labels), value in samples.items()
        if sample == name and value
    }


async def metrics(app: App) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What the proxy's /metrics says now, as `metric_samples` reads it."""
    status, body = await http(app.admin_port, "/metrics")
    assert status == 200
    return metric_samples(body)


async def until_waiting_for_a_lock(database: Database, statement_part: str) -> None:
    """Wait until PostgreSQL shows a statement holding `statement_part` waiting for another
    session's lock (in this test's database)."""
    query = (
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND strpos(query, '%s') > 0"
    )
    for _ in range(500):
        if await database.fetch(query % statement_part.replace("'", "''")):
            return
        await trio.sleep(0.01)  # nothing to wait on but PostgreSQL's own view
    raise AssertionError(f"no statement with {statement_part!r} waits for a lock")


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


async def unused_port() -> int:
    """A loopback port nothing listens on (now: a test may start something there later)."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def start_killable_switch(
    nursery: trio.Nursery, **options: Any
) -> tuple[SimSwitch, trio.CancelScope]:
    """A simulated switch, and the scope that kills it (listener and connections)."""
    switch = SimSwitch(SimSwitchOptions(**options))
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await switch.run(task_status=task_status)

    await nursery.start(run)
    return switch, scope


async def start_proxy(
    nursery: trio.Nursery,
    config: Config,
    *,
    links_up: bool = True,
    clock: Callable[[], datetime] = utc_now,
) -> tuple[App, int]:
    """The proxy; with `links_up`, once every link has passed its first echoes."""
    app = App(config, Secrets(pan_key=TEST_PAN_KEY, admin_token=TEST_ADMIN_TOKEN), clock=clock)
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
        self,
        port: int,
        framing: FrameFormat | None = None,
        spec: str = "default",
        source: str | None = None,
    ) -> Terminal:
        terminal = await Terminal.connect(
            "127.0.0.1", port, framing or FrameFormat(), load_spec(spec), source
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


@dataclass(frozen=True)
class Database:
    """A Postgres schema of this test's own (dropped afterwards)."""

    dsn: str
    schema: str

    def store(self, **settings: Any) -> dict[str, Any]:
        """The `store:` config section for a journal in this schema."""
        return {"dsn": self.dsn, "schema": self.schema, **settings}

    async def behind_chaos(self, nursery: trio.Nursery, mode: Mode) -> tuple[ChaosProxy, str]:
        """A fault-injecting relay in front of this database, and the DSN that goes through
        it (TCP, or the embedded server's Unix socket)."""
        url = urlsplit(self.dsn)
        socket_dir = parse_qs(url.query).get("host", [""])[0]
        target: tuple[str, int] | str = (
            f"{socket_dir}/.s.PGSQL.{url.port or 5432}"
            if socket_dir.startswith("/")
            else (url.hostname or "127.0.0.1", url.port or 5432)
        )
        chaos = ChaosProxy(target, mode)
        await nursery.start(chaos.run)
        netloc = f"{url.username or 'postgres'}@127.0.0.1:{chaos.port}"
        return chaos, urlunsplit(url._replace(netloc=netloc, query=""))

    async def fetch(self, sql: str) -> list[dict[str, Any]]:
        """Run a query in this schema from a helper thread (tests only)."""

        async def query() -> list[dict[str, Any]]:
            connection = await asyncpg.connect(
                self.dsn, server_settings={"search_path": self.schema}
            )
            try:
                return [dict(row) for row in await connection.fetch(sql)]
            finally:
                await connection.close()

        return await trio.to_thread.run_sync(asyncio.run, query())


_embedded_dsn: list[str] = []


def journal_dsn() -> str:
    """`ISO_PROXY_TEST_DSN`, else an embedded PostgreSQL started once for the session."""
    dsn = os.environ.get("ISO_PROXY_TEST_DSN")
    if dsn:
        return dsn
    if not _embedded_dsn:
        data_dir = Path(tempfile.gettempdir()) / f"iso-proxy-test-pg-{os.getuid()}"
        try:
            _embedded_dsn.append(start_embedded(data_dir))
        except EmbeddedUnavailable as error:
            pytest.skip(f"no ISO_PROXY_TEST_DSN and {error}")
    return _embedded_dsn[0]


@pytest.fixture
async def database() -> AsyncIterator[Database]:
    db = Database(journal_dsn(), f"test_{uuid.uuid4().hex[:12]}")
    yield db
    await db.fetch(f'DROP SCHEMA IF EXISTS "{db.schema}" CASCADE')
