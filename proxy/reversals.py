"""Store-and-forward reversals: sent to their switch until it acknowledges them.

Reversals wait in the journal's `reversals` table (queued with a timed-out outcome, for an
undelivered approval, ...). This worker leases the due ones (several instances share the
queue: a lease hides a reversal from the others, so each is sent by one instance at a
time), sends each over a healthy link of its switch (any switch when none is recorded),
the first attempt as 0400 / 0420 and the next ones as repeats 0401 / 0421, and records the
result: acknowledged on any answer, queued again with exponential backoff when there is
none, failed after `reversal.max_attempts` (logged, without card data).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from proxy import decisions
from proxy.backoff import Backoff
from proxy.config import ReversalConfig
from proxy.errors import ProxyError
from proxy.keys import match_key
from proxy.pool import Pool
from proxy.store import DueReversal, Store, StoreUnavailable

log = logging.getLogger("iso_proxy.reversals")

# A late answer to a reversal still acknowledges it: its pool tag names the reversal.
LATE_TAG = "reversal:"
# How many due reversals one lease takes, and how often an idle worker looks again.
LEASE_BATCH = 16
IDLE_POLL = 0.5


class ReversalWorker:
    """Sends due reversals until cancelled."""

    def __init__(
        self,
        store: Store,
        pool: Pool,
        config: ReversalConfig,
        match_fields: tuple[str, ...],
        lease: float,
        rng: random.Random,
    ) -> None:
        self._store = store
        self._pool = pool
        self._config = config
        self._match_fields = match_fields
        self._lease = lease
        self._rng = rng
        self._backoff = Backoff(config.backoff_initial, config.backoff_max)
        self.sent = 0
        self.acknowledged = 0
        self._recorded = trio.Event()

    async def recover(self, older_than: float, every: float) -> None:
        """Every `every` seconds (the first time at startup), queue reversals for claims a
        crash (or a lost outcome write) left open for longer than `older_than`."""
        while True:
            await self._store.wait_ready()
            try:
                if recovered := await self._store.recover(older_than, self._config.message):
                    log.warning("recovered %d open transaction(s): reversals queued", recovered)
            except StoreUnavailable as error:
                log.warning("recovery postponed: %s", error)
            await trio.sleep(every)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._store.wait_ready()
            try:
                due = await self._store.lease_reversals(LEASE_BATCH, self._lease)
            except StoreUnavailable:
                due = []
            for reversal in due:
                await self._send(reversal)
            if not due:
                await trio.sleep(min(IDLE_POLL, self._config.backoff_initial))

    async def _send(self, due: DueReversal) -> None:
        message = due.message()
        if due.attempts > 1:
            message = message.with_fields({}, mti=decisions.repeat_of(message.mti))
        self.sent += 1
        try:
            answered = await self._pool.forward(
                message,
                match_key(message, self._match_fields),
                tag=f"{LATE_TAG}{due.id}",
                switch=due.switch,
            )
        except ProxyError as error:
            if due.attempts >= self._config.max_attempts:
                log.error(
                    "reversal %d (%s) given up after %d attempts: %s",
                    due.id, message.mti, due.attempts, error,
                )  # fmt: skip
                await self._record(due, "failed", None, 0.0)
            else:
                delay = self._backoff.delay(due.attempts - 1, self._rng)
                log.warning("reversal %d unanswered (%s); again in %.1fs", due.id, error, delay)
                await self._record(due, "queued", None, delay)
            return
        rc = answered.response.get("39")
        log.info("reversal %d acknowledged by %s: rc=%r", due.id, answered.switch, rc)
        await self._record(due, "acknowledged", rc, 0.0)

    async def acknowledge_late(self, reversal_id: int, rc: str | None) -> None:
        """A switch answered a reversal after its deadline: that is an acknowledgment."""
        log.info("reversal %d acknowledged late: rc=%r", reversal_id, rc)
        await self._record_id(reversal_id, "acknowledged", rc, 0.0)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds; it is checked after each recorded attempt."""
        while not condition():
            await self._recorded.wait()

    async def _record(self, due: DueReversal, state: str, rc: str | None, retry_in: float) -> None:
        await self._record_id(due.id, state, rc, retry_in)

    async def _record_id(
        self, reversal_id: int, state: str, rc: str | None, retry_in: float
    ) -> None:
        try:
            await self._store.reversal_sent(reversal_id, state, rc, retry_in)
        except StoreUnavailable as error:  # its lease runs out; it will be sent again
            log.warning("reversal %d result not recorded (%s)", reversal_id, error)
            return
        if state == "acknowledged":
            self.acknowledged += 1
        self._recorded.set()
        self._recorded = trio.Event()
