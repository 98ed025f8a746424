"""Store-and-forward reversals: sent to their switch until it acknowledges them.

Reversals wait in the journal's `reversals` table (queued with a timed-out outcome, for an
undelivered approval, ...). This worker leases the due ones (several instances share the
queue: a lease hides a reversal from the others, so each is sent by one instance at a
time), sends each over a healthy link of its switch (any switch when none is recorded),
the first attempt as 0400 / 0420 and the next ones as repeats 0401 / 0421, and records the
result: acknowledged on an answer with an RC of `reversal.acknowledge_rcs`, queued again
with exponential backoff otherwise, failed after `reversal.max_attempts` attempts that
were written (logged, without card data). Attempts that never left the proxy (no link
up...) are not counted: an outage delays a reversal, it never fails it unsent.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from codec import Message
from proxy import decisions
from proxy.backoff import Backoff
from proxy.config import ReversalConfig
from proxy.errors import LinkLost, ProxyError, UpstreamTimeout
from proxy.keys import match_key
from proxy.pool import Pool
from proxy.store import DueReversal, Store, StoreUnavailable
from proxy.watch import Watch

log = logging.getLogger("iso_proxy.reversals")

# A late answer to a reversal still acknowledges it: its pool tag names the reversal.
LATE_TAG = "reversal:"
# How many due reversals one lease takes (one: its lease starts just before its send), and
# how often an idle worker looks again.
LEASE_BATCH = 1
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
        self.tried = 0
        self.acknowledged = 0
        self.failed = 0
        self.recovered = 0  # open claims closed by the recovery sweep
        self._recorded = Watch()

    async def recover(self, older_than: float, every: float) -> None:
        """Every `every` seconds (the first time at startup), queue reversals for claims a
        crash (or a lost outcome write) left open for longer than `older_than`."""
        while True:
            await self._store.wait_ready()
            try:
                if recovered := await self._store.recover(older_than, self._config.message):
                    log.warning("recovered %d open transaction(s): reversals queued", recovered)
                    self.recovered += recovered
                    self._recorded.changed()
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
        if due.attempts > 0 or due.lapsed:  # an earlier attempt was (maybe) written
            message = message.with_fields({}, mti=decisions.repeat_of(message.mti))
        if due.switch is not None and due.switch not in self._pool.switches:
            # It goes where its original went, or nowhere: it waits for that switch to be
            # configured again (or for an operator), looked at again as rarely as backoff
            # allows, and the log says which switch.
            delay = self._config.backoff_max
            log.warning(
                "reversal %d is for switch %r, which is not configured; again in %.1fs",
                due.id,
                due.switch,
                delay,
            )
            await self._record(due, "queued", None, delay, written=False)
            return
        try:
            answered = await self._pool.forward(
                message,
                match_key(message, self._match_fields),
                tag=f"{LATE_TAG}{due.id}",
                switch=due.switch,
                judge_link=False,  # a switch slow to reverse is not a dead link
            )
        except (UpstreamTimeout, LinkLost) as error:  # written, no answer
            await self._retry(due, message, error, written=True)
            return
        except ProxyError as error:  # never left: no link, key busy, not encodable
            await self._retry(due, message, error, written=False)
            return
        rc = answered.response.get("39")
        if rc in self._config.acknowledge_rcs:
            log.info("reversal %d acknowledged by %s: rc=%r", due.id, answered.switch, rc)
            await self._record(due, "acknowledged", rc, 0.0, written=True)
        else:  # the switch did not process it (91, 96, a stand-in...): again later
            await self._retry(due, message, f"answered rc={rc!r}", written=True, rc=rc)

    async def _retry(
        self,
        due: DueReversal,
        message: Message,
        why: object,
        *,
        written: bool,
        rc: str | None = None,
    ) -> None:
        attempts = due.attempts + written
        if written and attempts >= self._config.max_attempts:
            log.error(
                "reversal %d (%s) given up after %d attempts: %s",
                due.id,
                message.mti,
                attempts,
                why,
            )
            await self._record(due, "failed", rc, 0.0, written=written)
            return
        # Attempts that never left the proxy (switch down...) are not counted: an outage
        # delays a reversal, it never makes it give up unsent.
        delay = self._backoff.delay(max(attempts - 1, 0), self._rng)
        log.warning("reversal %d not acknowledged (%s); again in %.1fs", due.id, why, delay)
        await self._record(due, "queued", rc, delay, written=written)

    async def acknowledge_late(self, reversal_id: int, rc: str | None) -> None:
        """A switch answered a reversal after its deadline: that is an acknowledgment."""
        log.info("reversal %d acknowledged late: rc=%r", reversal_id, rc)
        await self._record_id(reversal_id, "acknowledged", rc, 0.0, written=False)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds; it is checked after each recorded attempt and
        each recovery sweep that closed claims."""
        await self._recorded.wait_until(condition)

    async def _record(
        self, due: DueReversal, state: str, rc: str | None, retry_in: float, *, written: bool
    ) -> None:
        await self._record_id(due.id, state, rc, retry_in, written=written)

    async def _record_id(
        self, reversal_id: int, state: str, rc: str | None, retry_in: float, *, written: bool
    ) -> None:
        try:
            if not await self._store.reversal_sent(reversal_id, state, rc, retry_in, written):
                log.warning("reversal %d: lease lapsed, another instance has it", reversal_id)
                return
        except StoreUnavailable as error:  # its lease runs out; it will be sent again
            log.warning("reversal %d result not recorded (%s)", reversal_id, error)
            return
        self.tried += 1
        if state == "acknowledged":
            self.acknowledged += 1
        elif state == "failed":
            self.failed += 1
        self._recorded.changed()
