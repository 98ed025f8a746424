"""Composition root: builds the services from a config and runs them in one nursery."""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from codec import Spec
from proxy import tls
from proxy.admin import AdminServer
from proxy.config import Config, SwitchConfig, load_config
from proxy.errors import ConfigError
from proxy.forwarder import Forwarder, Journal, utc_now
from proxy.latency import percentile
from proxy.metrics import ProxyCollector, registry_for
from proxy.pool import Pool
from proxy.reversals import ReversalWorker
from proxy.server import Server
from proxy.store import Store, StoreSettings, StoreUnavailable, dsn_problem
from proxy.transactions import TransactionIdentity
from proxy.upstream import WRITE_GRACE, Link, tcp_dialer

log = logging.getLogger("iso_proxy")

# How often claims left open (by a crash, or a lost outcome write) are looked for.
RECOVERY_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class Secrets:
    """What the environment provides and the config never holds."""

    dsn: str | None = field(default=None, repr=False)
    pan_key: bytes | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    tls_key_password: str | None = field(default=None, repr=False)


class App:
    """The whole proxy. `run` reports the terminal port once links have tried to connect."""

    def __init__(
        self,
        config: Config,
        secrets: Secrets | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = utc_now,
        config_path: Path | None = None,
    ) -> None:
        secrets = secrets or Secrets()
        self.config = config
        self.config_path = config_path
        self._nursery: trio.Nursery | None = None
        self._wanted: dict[str, SwitchConfig] = {}  # the switches the latest reload wants
        self.instance = uuid.uuid4().hex[:12]
        tls.check(config, secrets.tls_key_password)
        self._tls_key_password = secrets.tls_key_password
        self.pool = Pool(
            config.switches,
            config.health,
            config.routing,
            rng or random.Random(),
            dial=tcp_dialer(secrets.tls_key_password),
        )
        self.store: Store | None = None
        self.reversals: ReversalWorker | None = None
        journal = None
        if config.store.enabled:
            dsn = config.store.dsn or secrets.dsn
            if dsn is None:
                raise ValueError("the journal needs a DSN (store.dsn or ISO_PROXY_DSN)")
            if (problem := dsn_problem(dsn)) is not None:
                where = "store.dsn" if config.store.dsn else "ISO_PROXY_DSN"
                raise ConfigError([f"{where}: {problem}"])
            self.store = Store(
                StoreSettings(
                    dsn=dsn,
                    schema=config.store.schema,
                    timeout=config.store.timeout,
                    pool_size=config.store.pool_size,
                    batch_max=config.store.batch_max,
                    batch_wait=config.store.batch_wait_ms / 1000,
                    instance=self.instance,
                )
            )
            pan_key = secrets.pan_key if config.idempotency.pan_hash else None
            journal = Journal(
                store=self.store,
                identity=TransactionIdentity(config.idempotency.key_fields, pan_key),
                on_conflict=config.idempotency.on_conflict,
                join_timeout=max(s.timeout for s in config.switches) + 2 * config.store.timeout + 1,
                reversal=config.reversal,
                clock=clock,
            )
        self.forwarder = Forwarder(
            self.pool,
            config.routing.match_key,
            journal,
            timeout_rc=config.reversal.timeout_rc,
            joiners_wait=config.listen.write_timeout + 1,
        )
        if self.store is not None:
            longest = max(s.timeout for s in config.switches)
            self.reversals = ReversalWorker(
                self.store,
                self.pool,
                config.reversal,
                config.routing.match_key,
                lease=longest + WRITE_GRACE + config.store.timeout + 5,
                rng=rng or random.Random(),
            )
            # No live claim stays open longer than this: claim, wait, write, outcome.
            self.orphan_age = longest + WRITE_GRACE + 2 * config.store.timeout + 1
        self.server = Server(
            config.listen,
            config.clients,
            self.forwarder,
            tls.server_context(config.listen.tls, secrets.tls_key_password)
            if config.listen.tls is not None
            else None,
        )

        self.registry = registry_for(
            ProxyCollector(self.pool, self.server, self.forwarder, self.reversals)
        )
        self.admin: AdminServer | None = None
        if config.admin.enabled:
            self.admin = AdminServer(
                config.admin.host,
                config.admin.port,
                self.registry,
                self.readiness,
                self.status,
                self.act_on_switch,
                self.reload,
                secrets.admin_token,
            )
        self.admin_port = 0

    def readiness(self) -> list[str]:
        """What keeps the proxy from taking traffic; empty when it is ready."""
        problems = []
        if self.server.draining:
            problems.append("draining")
        if self.store is not None and not self.store.ready:
            problems.append("store unreachable")
        if not any(link.is_up for links in self.pool.links.values() for link in links):
            problems.append("no switch link up")
        return problems

    async def reload(self) -> list[str]:
        """Re-read the switch list from the config file: add, remove and re-weight switches
        without touching terminal connections. Problems with the file, or [] when done.
        (Other sections take effect at the next start.)"""
        if self.config_path is None or self._nursery is None:
            return ["no config file to reload"]
        try:
            fresh = load_config(self.config_path)
            tls.check(fresh, self._tls_key_password)
        except ConfigError as error:
            return error.problems
        # A switch still being removed (an earlier reload's) counts as gone: wanted again,
        # it comes back once the removal is over.
        current = {n: s for n, s in self.pool.switches.items() if n not in self.pool.removing}
        listener_spec = self.config.listen.endpoint.spec
        wanted = self._wanted = {
            switch.name: _sharing_spec(switch, listener_spec)
            for switch in fresh.switches
            if switch.enabled
        }
        for name in current.keys() - wanted.keys():
            self.pool.remove_switch(name)
        for name, switch in wanted.items():
            if name in current and _same_endpoint(current[name], switch):
                self.pool.update_switch(switch)
            elif name in current or name in self.pool.removing:
                # Marked for removal now (so a reload right after sees it so), back after
                self._nursery.start_soon(self._add_when_gone, name, self.pool.remove_switch(name))
            else:
                self.pool.add_switch(switch)
        log.warning("reloaded %s: switches %s", self.config_path, ", ".join(sorted(wanted)))
        return []

    async def _add_when_gone(self, name: str, gone: trio.Event) -> None:
        """Once `name`'s removal is over, add it as the latest reload wants it, if it still
        does and nothing else added it meanwhile."""
        await gone.wait()
        switch = self._wanted.get(name)
        if switch is not None and name not in self.pool.switches:
            self.pool.add_switch(switch)

    def act_on_switch(self, name: str, action: str) -> bool:
        """Drain a switch (no new requests; in flight ones finish; echoes go on) or enable it;
        False for a switch unknown, or being removed."""
        if name not in self.pool.links or name in self.pool.removing:
            return False
        if action == "drain":
            self.pool.drained.add(name)
        else:
            self.pool.drained.discard(name)
        return True

    async def status(self) -> dict[str, Any]:
        """Each switch and link: state, echo round trips, requests in flight; the queue."""
        switches = {}
        for name, links in self.pool.links.items():
            switches[name] = {
                "up": any(link.is_up for link in links),
                "drained": name in self.pool.drained,
                "in_flight": sum(self.pool.in_flight(link) for link in links),
                "links": {link.name: _link_status(self.pool, link) for link in links},
            }
        queued = None
        if self.store is not None:
            with contextlib.suppress(StoreUnavailable):
                queued = await self.store.reversals_queued()
        return {"ready": not self.readiness(), "switches": switches, "reversals_queued": queued}

    async def stop(self, grace: float) -> None:
        """A graceful stop: no new terminal connections; requests taken get their answers
        (at most `grace` seconds), then the caller cancels `run` (links sign off)."""
        if await self.server.drain(grace):
            log.info("drained: every request taken was answered")
        else:
            log.warning(
                "grace of %gs over with %d request(s) unanswered", grace, self.server.in_flight
            )

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        # The journal stops last: cancelled with the rest, a request's handler still makes
        # one shielded try to queue its undelivered approval's reversal, which needs it.
        journal_scope = trio.CancelScope(shield=True)
        async with trio.open_nursery() as outer:
            if self.store is not None:
                await outer.start(self._run_journal, self.store, journal_scope)
            try:
                async with trio.open_nursery() as nursery:
                    await self._run_rest(nursery, task_status)
            finally:
                journal_scope.cancel()

    @staticmethod
    async def _run_journal(
        store: Store, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with scope:
            await store.run(task_status=task_status)

    async def _run_rest(self, nursery: trio.Nursery, task_status: trio.TaskStatus[int]) -> None:
        """Everything but the journal: admin, links, reversals, recovery, the listener."""
        self._nursery = nursery
        if self.admin is not None:
            self.admin_port = await nursery.start(self.admin.run)
        await nursery.start(self.pool.run)
        if self.reversals is not None:
            await nursery.start(self.reversals.run)
            nursery.start_soon(
                self.forwarder.record_late_answers, self.pool.late_answers, self.reversals
            )
            every = min(RECOVERY_EVERY, self.orphan_age)
            nursery.start_soon(self.reversals.recover, self.orphan_age, every)
        port: int = await nursery.start(self.server.run)
        task_status.started(port)


def _link_status(pool: Pool, link: Link) -> dict[str, Any]:
    rtts = list(link.echo_rtts)
    milliseconds = [round(rtt * 1000, 3) for rtt in rtts]
    return {
        "state": link.state.value,
        "connects": link.connects,
        "in_flight": pool.in_flight(link),
        "last_echo_ms": milliseconds[-1] if milliseconds else None,
        "echo_p50_ms": round(percentile(rtts, 0.5) * 1000, 3) if rtts else None,
        "echo_p99_ms": round(percentile(rtts, 0.99) * 1000, 3) if rtts else None,
        "echoes_failed": link.echoes_failed,
    }


def _sharing_spec(switch: SwitchConfig, spec: Spec) -> SwitchConfig:
    """`switch` holding the running listener's spec object where it names the same spec, so
    messages keep passing between them as their bytes after a reload (codec.Message.wire)."""
    if switch.endpoint.spec is not spec and switch.endpoint.spec == spec:
        return replace(switch, endpoint=replace(switch.endpoint, spec=spec))
    return switch


def _same_endpoint(old: SwitchConfig, new: SwitchConfig) -> bool:
    """Whether `new` can take over `old`'s links as they are (same place, same wire)."""

    def wire(switch: SwitchConfig) -> tuple[object, ...]:
        return (switch.host, switch.port, switch.connections, switch.endpoint, switch.tpdu,
                switch.sign_on, switch.tls)  # fmt: skip

    return wire(old) == wire(new)
