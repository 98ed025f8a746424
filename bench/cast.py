"""The benchmark's cast: two simulated switches and the proxy in front of them, each its
own process, with the journal in a schema of its own (dropped afterwards); and beside the
proxy, a bare trio byte forwarder to the first switch (`fixtures.bare_forwarder`), the
measure of what the machine can do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import trio
import yaml

from bench.processes import STARTUP_TIMEOUT, Service, free_port, run_json, start_service
from fixtures.flood import raise_fd_limit
from proxy.embedded import EmbeddedUnavailable, start_embedded

PAN_KEY = "bench-pan-key-not-a-secret"
SWITCHES = ("alpha", "beta")


@dataclass
class Cast:
    switches: tuple[Service, ...]  # direct runs go to the first
    proxy: Service
    forwarder: Service  # the bare trio forwarder, to the first switch
    admin_port: int  # the proxy's
    dsn: str
    schema: str
    runs: int = 0

    @property
    def switch(self) -> Service:
        """The switch direct runs go to."""
        return self.switches[0]

    def next_tag(self) -> str:
        """Terminal ids for the next load run: unique within this cast's journal schema."""
        self.runs += 1
        return f"{self.runs:03d}"

    async def load(
        self, port: int, connections: int, duration: float, rate: float | None = None
    ) -> dict[str, Any]:
        """One run of the load generator (`bench.load`, its own process) at `port`: open
        loop at `rate`, else closed loop; the summary it printed."""
        mode = ["--rate", str(rate)] if rate is not None else ["--closed"]
        argv = ["bench.load", "127.0.0.1", str(port), "--connections", str(connections)]
        argv += ["--tag", self.next_tag(), *mode, "--duration", str(duration)]
        with trio.fail_after(duration + 120):
            return await run_json(argv)


def database(given: str | None) -> str:
    """The DSN to journal to: `given`, ISO_PROXY_TEST_DSN, ISO_PROXY_DSN, else the embedded
    PostgreSQL (started if need be)."""
    dsn = given or os.environ.get("ISO_PROXY_TEST_DSN") or os.environ.get("ISO_PROXY_DSN")
    if dsn:
        return dsn
    try:
        return start_embedded(Path(tempfile.gettempdir()) / f"iso-proxy-bench-pg-{os.getuid()}")
    except EmbeddedUnavailable as error:
        raise SystemExit(f"benchmark: no database: {error}") from None


async def sql(dsn: str, schema: str, statement: str) -> Any:
    """Run one statement in `schema` (created if missing) from a helper thread; the first
    value it returns."""

    async def query() -> Any:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await connection.execute(f'SET search_path TO "{schema}"')
            return await connection.fetchval(statement)
        finally:
            await connection.close()

    return await trio.to_thread.run_sync(asyncio.run, query())


async def journal_rows(cast: Cast) -> int:
    """Transactions the journal holds as answered."""
    rows: int = await sql(
        cast.dsn, cast.schema, "SELECT count(*) FROM transactions WHERE state = 'answered'"
    )
    return rows


def proxy_config(folder: Path, ports: dict[str, int], dsn: str, schema: str) -> Path:
    """A production-like config: journal, health checks and admin on; logs at WARNING."""
    config = {
        "listen": {
            "host": "127.0.0.1",
            "port": ports["proxy"],
            "max_connections": 20_000,
            "max_connections_per_ip": 20_000,
        },
        "clients": [{"name": "bench", "networks": ["127.0.0.0/8"]}],
        "switches": [
            {"name": name, "host": "127.0.0.1", "port": ports[name], "connections": 2}
            for name in SWITCHES
        ],
        "store": {"dsn": dsn, "schema": schema},
        "admin": {"host": "127.0.0.1", "port": ports["admin"]},
        "log": {"level": "WARNING"},
    }
    path = folder / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def wait_ready(admin_port: int) -> None:
    """Wait until the proxy says it is ready (its links up, the journal reachable)."""
    with trio.fail_after(STARTUP_TIMEOUT):
        while True:
            with contextlib.suppress(OSError):
                if (await admin_get(admin_port, "/readyz")).startswith(b"HTTP/1.1 200"):
                    return
            await trio.sleep(0.1)  # nothing to wait on but the proxy's own answer


async def admin_get(admin_port: int, path: str) -> bytes:
    """The proxy's admin server's whole answer to `GET path`, status line first."""
    async with await trio.open_tcp_stream("127.0.0.1", admin_port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        answer = bytearray()
        while chunk := await stream.receive_some(65536):  # one answer, then it closes
            answer += chunk
    return bytes(answer)


async def client_connections(cast: Cast) -> int:
    """Terminal connections the proxy holds now (its isoproxy_client_connections gauge)."""
    answer = await admin_get(cast.admin_port, "/metrics")
    for line in answer.decode(errors="replace").splitlines():
        if line.startswith("isoproxy_client_connections "):
            return int(float(line.split()[1]))
    raise RuntimeError("the proxy's metrics have no isoproxy_client_connections")


async def wait_admitted(cast: Cast, count: int) -> None:
    """Wait until the proxy holds `count` terminal connections (a client counts one as
    open before the proxy has accepted it)."""
    with trio.fail_after(300):
        while True:
            if await client_connections(cast) >= count:
                return
            await trio.sleep(0.2)  # nothing to wait on but the proxy's own count


@asynccontextmanager
async def running_cast(dsn: str) -> AsyncIterator[Cast]:
    """Switches, forwarder and proxy up (the proxy's links too); everything stopped
    afterwards."""
    raise_fd_limit()  # the proxy inherits it: idle runs need many descriptors
    schema = f"bench_{datetime.now(UTC):%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
    ports = {name: free_port() for name in (*SWITCHES, "proxy", "admin", "forwarder")}
    with tempfile.TemporaryDirectory(prefix="iso-proxy-bench-") as tmp:
        folder = Path(tmp)
        config = proxy_config(folder, ports, dsn, schema)
        try:
            async with trio.open_nursery() as nursery:
                switches = []
                for name in SWITCHES:
                    argv = ["proxy", "sim-switch", "--port", str(ports[name])]
                    switches.append(
                        await start_service(
                            nursery, name, argv, ports[name], log=folder / f"{name}.log"
                        )
                    )
                argv = ["fixtures.bare_forwarder", "--port", str(ports["forwarder"])]
                argv += ["--upstream-port", str(ports[SWITCHES[0]])]
                forwarder = await start_service(
                    nursery, "forwarder", argv, ports["forwarder"], log=folder / "forwarder.log"
                )
                proxy = await start_service(
                    nursery,
                    "proxy",
                    ["proxy", "run", "-c", str(config)],
                    ports["proxy"],
                    env={"ISO_PROXY_PAN_KEY": PAN_KEY},
                    log=folder / "proxy.log",
                )
                await wait_ready(ports["admin"])
                yield Cast(tuple(switches), proxy, forwarder, ports["admin"], dsn, schema)
                nursery.cancel_scope.cancel()
        finally:
            await sql(dsn, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
