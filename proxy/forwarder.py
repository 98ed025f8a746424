"""From a terminal's decoded message to the answer it gets, through the journal."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import trio

from codec import Message, Mti, mask_pan
from proxy import decisions
from proxy.config import ReversalConfig
from proxy.errors import (
    NoLinkAvailable,
    ProxyError,
    UnencodableMessage,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.keys import match_key
from proxy.latency import Histogram
from proxy.pool import Answered, Chooser, LateAnswer, Pool
from proxy.responses import answer
from proxy.reversals import LATE_TAG, ReversalWorker
from proxy.store import Queued, ReplayHold, Store, StoreUnavailable
from proxy.transactions import (
    Claim,
    Outcome,
    Recorded,
    TransactionIdentity,
    outcome_of,
    replay,
    reversal_for,
)
from proxy.watch import Watch

log = logging.getLogger("iso_proxy.transactions")

# While a duplicate waits for a transaction another instance carries, it asks the journal
# this often whether that transaction has ended.
JOIN_POLL = 0.05
# Keys whose answer reached a terminal, remembered so a copy lost elsewhere is not reversed.
MAX_DELIVERED_KEYS = 10_000
# Waits between tries to queue the reversal of an undelivered approval while the store is
# away (after the last, the claim-recovery sweep cannot help: the row is complete).
UNDELIVERED_RETRIES = (0.5, 1.0, 2.0, 4.0)
# When shutdown cuts that wait short, how long queuing the reversal may still take.
LAST_CHANCE = 5.0

V = TypeVar("V")


def _remember(table: OrderedDict[str, V], key: str, value: V) -> None:
    """`key` as `table`'s newest entry; the oldest go past MAX_DELIVERED_KEYS."""
    table.pop(key, None)
    table[key] = value
    while len(table) > MAX_DELIVERED_KEYS:
        table.popitem(last=False)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Journal:
    """The journal and what it needs: the store, how to name transactions, the policy,
    and the wall clock that dates requests without field 7 (and resolves its year)."""

    store: Store
    identity: TransactionIdentity
    on_conflict: str
    join_timeout: float
    reversal: ReversalConfig
    clock: Callable[[], datetime] = field(default=utc_now)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the journal needs to reverse an answer its terminal never received. A
    duplicate's receipt (`original` False) only tells that the answer did get through."""

    claim: Claim
    switch: str | None
    rc: str
    original: bool = True
    joined: bool = False  # a duplicate that waited for the original on this instance
    replayed: bool = False  # the journal's answer given again to a repeat of the same content
    hold: ReplayHold | None = None  # its row, locked until this answer's delivery is known


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer for the terminal, and its receipt when the journal recorded it (or may
    have: `stands_in` when `message` is RC 96 in place of the receipt's answer, which the
    terminal then never gets)."""

    message: Message
    receipt: Receipt | None = None
    stands_in: bool = False
    write_by: float | None = None  # a replay holding its row: written by then, or not at all


class _Pending:
    """A transaction this instance is carrying: duplicates wait here for its outcome."""

    __slots__ = ("claim", "ended", "ending", "recorded", "unrecorded_rc")

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.ended = False
        self.ending = Watch()  # an event only once a duplicate waits: most never have one
        self.recorded: Recorded | None = None
        self.unrecorded_rc: str | None = None  # what its terminal got when it ended unrecorded


class Forwarder:
    """Applies the policy table to one message and returns the answer, if any.

    With a journal, a financial request is claimed before anything is forwarded, its
    outcome is recorded before it is answered, and duplicates are replayed, joined or
    refused without reaching a switch (see `proxy.transactions` and `proxy.store`).
    """

    def __init__(
        self,
        pool: Pool,
        match_fields: tuple[str, ...],
        journal: Journal | None = None,
        *,
        timeout_rc: str = decisions.SWITCH_INOPERATIVE,
        joiners_wait: float = 11.0,
    ) -> None:
        """`joiners_wait`: how long an undelivered approval waits for duplicates that
        joined it here to write the same answer (the terminals' write timeout, and some)."""
        self._pool = pool
        self._match_fields = match_fields
        self._journal = journal
        self._timeout_rc = timeout_rc
        self._joiners_wait = joiners_wait
        self.late_recorded = 0
        self._late_changed = Watch()
        self._carrying: dict[str, _Pending] = {}
        # Keys recently answered to a terminal: every RC given, oldest first. (A dict
        # emptied from its front scans the holes left there: 8 us a transaction.)
        self._delivered: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._joining: Counter[str] = Counter()  # duplicates of a key whose answer is pending
        # Undelivered approvals whose reversal this instance began to queue (an insert
        # under way, written, or failed but maybe written; the most recent keys, dropped
        # when queuing gave up, or the journal holds no reversal because a repeat was given
        # the approval): a repeat does not replay such an approval, even if its look in
        # the journal came too early to see the reversal (`_may_replay`).
        self._reversing: OrderedDict[str, None] = OrderedDict()
        self._joiners_settled = Watch()
        self.duplicates: Counter[decisions.Duplicate] = Counter()
        # For metrics: answers by (switch, MTI, RC), timeouts by switch, latencies.
        self.transactions: Counter[tuple[str, str, str]] = Counter()
        self.timeouts: Counter[str] = Counter()
        self.upstream_latency: defaultdict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.request_duration: defaultdict[str, Histogram] = defaultdict(Histogram)

    async def handle(self, message: Message) -> Reply | None:
        started = trio.current_time()
        try:
            return await self._handle(message)
        finally:
            self.request_duration[message.mti.code].observe(trio.current_time() - started)

    async def _handle(self, message: Message) -> Reply | None:
        decision = decisions.from_terminal(message)
        if decision.action is decisions.Action.DROP:
            log.warning("dropped %s from a terminal: %s", message.mti, decision.reason)
            return None
        if decision.action is decisions.Action.ANSWER and decision.rc is not None:
            return Reply(answer(message, decision.rc))
        if self._journal is None:
            response, _ = await self._forward(message, None)
            return Reply(response)
        return await self._journaled(message, self._journal)

    async def delivered(self, receipt: Receipt) -> None:
        """An answer reached its terminal: a copy of the same answer that did not (on a
        connection the terminal had already dropped, say) is then no reason to reverse.
        An approval a repeat got from the journal is noted there too, for the instance
        that carried the original (it may be another)."""
        claim = receipt.claim
        # Every answer of this transaction given for the key (the original's, or its
        # recorded answer given again to the same content): a later other one (a 94) must
        # not hide an approval a repeat delivered, and other content given the approval
        # (`on_conflict: replay`) does not count as the original's delivery.
        if receipt.original or receipt.replayed:
            delivered = self._delivered.get(claim.key, frozenset())
            _remember(self._delivered, claim.key, delivered | {receipt.rc})
        if receipt.joined:
            self._joiner_done(claim.key)
        if receipt.hold is not None:  # the replay is noted as its row is let go
            assert self._journal is not None
            await self._journal.store.release_hold(receipt.hold, delivered=True)
        elif (
            receipt.replayed
            and self._journal is not None
            and decisions.reversible_approval(Mti.parse(claim.mti), receipt.rc)
        ):  # replayed unchecked (the journal could not be asked): noted now
            # Shielded and bounded: a stop must not drop it (the original's instance would
            # reverse what this terminal holds).
            with trio.CancelScope(shield=True), trio.move_on_after(LAST_CHANCE) as bound:
                try:
                    await self._journal.store.mark_replayed(claim.key)
                except StoreUnavailable as error:
                    log.warning("%s approval replayed; not noted (%s)", claim.mti, error)
            if bound.cancelled_caught:
                log.warning("%s approval replayed; not noted (store too slow)", claim.mti)

    def _joiner_done(self, key: str) -> None:
        self._joining[key] -= 1
        if self._joining[key] <= 0:
            del self._joining[key]
        self._joiners_settled.changed()

    async def undelivered(self, receipt: Receipt) -> None:
        """The terminal never got this answer (its connection was gone before it could be
        written, or it got RC 96 in its place): an approval is reversed (policy
        `reversal.on_undelivered`), unless a duplicate of the same transaction carried the
        same answer to the terminal."""
        journal = self._journal
        claim = receipt.claim
        if receipt.hold is not None:  # the original's reversal, if due, may go ahead
            assert journal is not None
            await journal.store.release_hold(receipt.hold, delivered=False)
        if not receipt.original:
            if receipt.joined:
                self._joiner_done(claim.key)
            return
        if journal is None or not decisions.reverse_if_undelivered(
            Mti.parse(claim.mti), receipt.rc, journal.reversal.on_undelivered
        ):
            return
        # A duplicate that joined this transaction gets the same answer as soon as it is
        # recorded, often just after this write failed: let it try before reversing.
        try:
            with trio.move_on_after(self._joiners_wait):
                await self._joiners_settled.wait_until(
                    lambda: self._carried(receipt) or not self._joining[claim.key]
                )
            if not self._carried(receipt):
                await self._queue_undelivered(receipt, journal, retries=UNDELIVERED_RETRIES)
        except trio.Cancelled:  # shutting down (waiting, or between tries): one more
            if not self._carried(receipt):
                with trio.CancelScope(shield=True), trio.move_on_after(LAST_CHANCE):
                    await self._queue_undelivered(receipt, journal, retries=())
            raise

    def _carried(self, receipt: Receipt) -> bool:
        """Whether the terminal got this answer another way (a duplicate got the same RC)."""
        return receipt.rc in self._delivered.get(receipt.claim.key, ())

    async def _queue_undelivered(
        self, receipt: Receipt, journal: Journal, retries: tuple[float, ...]
    ) -> None:
        claim = receipt.claim
        reversal = reversal_for(claim.fields, claim.mti, journal.reversal.message, journal.clock())
        if self._carried(receipt):  # a repeat got the approval meanwhile
            log.warning("%s approval undelivered, then carried by a repeat", claim.mti)
            return
        _remember(self._reversing, claim.key, None)
        try:
            for delay in (*retries, None):
                try:
                    queued = await journal.store.queue_reversal(
                        claim.key, receipt.switch, reversal, "undelivered"
                    )
                    log.warning("%s approval undelivered: reversal %s", claim.mti, queued.value)
                    if queued is Queued.NOT_NEEDED:  # a repeat has it: the journal decides
                        self._reversing.pop(claim.key, None)
                    return
                except StoreUnavailable as error:
                    log.warning(
                        "%s approval undelivered; reversal not queued yet (%s)", claim.mti, error
                    )
                if delay is None:
                    break
                await trio.sleep(delay)
        except Exception:
            self._reversing.pop(claim.key, None)
            raise
        self._reversing.pop(claim.key, None)  # the journal decides again
        log.error("%s approval undelivered; reversal NOT queued: the store is away", claim.mti)

    async def record_late_answers(
        self, late: trio.MemoryReceiveChannel[LateAnswer], reversals: ReversalWorker | None
    ) -> None:
        """Record answers that came after their deadline (never delivered to anyone): a
        transaction's, against its row; a reversal's, as its acknowledgment."""
        journal = self._journal
        async for answer_ in late:
            if journal is None:
                continue
            if answer_.tag.startswith(LATE_TAG):
                if reversals is not None:
                    reversal_id = int(answer_.tag.removeprefix(LATE_TAG))
                    await reversals.acknowledge_late(reversal_id, answer_.response.get("39"))
                continue
            rc = answer_.response.get("39") or ""
            try:
                await journal.store.record_late(answer_.tag, rc, answer_.latency_ms)
            except StoreUnavailable as error:
                log.warning("late answer not recorded (%s)", error)
                continue
            self.late_recorded += 1
            self._late_changed.changed()

    async def wait_late_recorded(self, count: int) -> None:
        """Wait until `count` late answers have been recorded (for tests and operators)."""
        await self._late_changed.wait_until(lambda: self.late_recorded >= count)

    async def _journaled(self, message: Message, journal: Journal) -> Reply:
        claim = journal.identity.claim(message, journal.clock())
        carried = self._carrying.get(claim.key)
        if carried is not None:  # a duplicate of a transaction this instance carries
            self._joining[claim.key] += 1  # until its terminal got the answer, or not
            try:
                reply, replayed, hold = await self._duplicate(
                    message, claim, carried.claim.fingerprint, carried
                )
            except BaseException:
                self._joiner_done(claim.key)
                raise
            rc = reply.get("39") or ""
            receipt = Receipt(claim, None, rc, False, joined=True, replayed=replayed, hold=hold)
            return Reply(reply, receipt, write_by=self._write_by(hold))
        pending = _Pending(claim)
        self._carrying[claim.key] = pending
        try:
            # The claim names the switch the request goes to, so that recovery reverses it
            # there: a terminal's reversal goes where its original went, else the next in
            # turn. The switch is chosen now, and the request forwarded to it alone.
            original = await self._original_switch(message, journal)
            with self._pool.choosing() as choose:
                claim = pending.claim = claim.naming(original or choose(()))
                try:
                    recorded = await journal.store.claim(claim)
                except StoreUnavailable as error:
                    _log_outcome(message, decisions.SYSTEM_MALFUNCTION, str(error), 0.0)
                    pending.unrecorded_rc = decisions.SYSTEM_MALFUNCTION
                    return Reply(answer(message, decisions.SYSTEM_MALFUNCTION))
                if recorded is not None:  # claimed before, by another instance or run
                    reply, replayed, hold = await self._duplicate(
                        message, claim, recorded.fingerprint, recorded
                    )
                    # Its delivery is noted: an undelivered original's reversal, not yet
                    # queued, is then not needed.
                    rc = reply.get("39") or ""
                    receipt = Receipt(claim, None, rc, False, replayed=replayed, hold=hold)
                    return Reply(reply, receipt, write_by=self._write_by(hold))
                response, outcome = await self._forward(
                    message, claim, claim.switch, choose=None if original else choose
                )
            assert outcome is not None
            try:
                recorded_now = await journal.store.complete(outcome)
            except StoreUnavailable as error:
                # No answer leaves without its record: the terminal is told the system
                # failed. The write may have landed all the same (the database committed,
                # then its reply was lost or too slow), so the claim is not certain to stay
                # open for recovery: the switch's answer is settled as undelivered.
                log.error("outcome of %s not recorded (%s); answering 96", message.mti, error)
                pending.unrecorded_rc = decisions.SYSTEM_MALFUNCTION
                return Reply(
                    answer(message, decisions.SYSTEM_MALFUNCTION),
                    Receipt(claim, outcome.switch, outcome.rc),
                    stands_in=True,
                )
            if not recorded_now:
                log.error("outcome of %s found its claim already closed", message.mti)
            pending.recorded = _as_recorded(claim, outcome)
            return Reply(response, Receipt(claim, outcome.switch, outcome.rc))
        finally:
            del self._carrying[claim.key]
            pending.ended = True
            pending.ending.changed()

    async def _duplicate(
        self,
        message: Message,
        claim: Claim,
        held_fingerprint: bytes,
        held: Recorded | _Pending,
    ) -> tuple[Message, bool, ReplayHold | None]:
        """The answer to a duplicate; whether it is the answer recorded for the key given
        again to the same content; and for an approval so given, the hold on its row until
        the answer's delivery is known. `held` is what the journal holds for the key, or the
        transaction in flight here."""
        journal = self._journal
        assert journal is not None
        recorded = held if isinstance(held, Recorded) else None
        completed = recorded is not None and recorded.completed
        action = decisions.on_duplicate(
            held_fingerprint, completed, claim.fingerprint, journal.on_conflict
        )
        self.duplicates[action] += 1
        if action is decisions.Duplicate.REJECT:
            _log_outcome(message, decisions.DUPLICATE_TRANSMISSION, "same key, other content", 0)
            return answer(message, decisions.DUPLICATE_TRANSMISSION), False, None
        if action is decisions.Duplicate.JOIN:
            local = held if isinstance(held, _Pending) else None
            if local is not None:
                with trio.move_on_after(journal.join_timeout):
                    await local.ending.wait_until(lambda: local.ended)
                if local.unrecorded_rc is not None:
                    return answer(message, local.unrecorded_rc), False, None
                recorded = local.recorded
            if recorded is None or not recorded.completed:
                recorded = await self._poll(claim.key, journal)
            if (
                recorded is not None
                and decisions.on_duplicate(
                    recorded.fingerprint, recorded.completed, claim.fingerprint, journal.on_conflict
                )
                is decisions.Duplicate.REJECT
            ):  # what ended under the key is another transaction
                return answer(message, decisions.DUPLICATE_TRANSMISSION), False, None
        if recorded is None or not recorded.completed:
            _log_outcome(message, decisions.SWITCH_INOPERATIVE, "joined, no outcome", 0)
            return answer(message, decisions.SWITCH_INOPERATIVE), False, None
        same_content = recorded.fingerprint == claim.fingerprint
        response = replay(message, recorded)
        allowed, hold = await self._may_replay(claim, recorded, journal, same_content)
        if not allowed:
            why = "approval being reversed, or its row busy"
            _log_outcome(message, decisions.SYSTEM_MALFUNCTION, why, 0)
            return answer(message, decisions.SYSTEM_MALFUNCTION), False, None
        _log_outcome(message, recorded.rc or "", "replayed", 0)
        return response, same_content, hold

    async def _may_replay(
        self, claim: Claim, recorded: Recorded, journal: Journal, same_content: bool
    ) -> tuple[bool, ReplayHold | None]:
        """Whether an answer held in the journal may be given again; for an approval given
        again to the same content, with the hold on its row.

        An approval whose terminal never got it has a reversal queued: replaying it would
        leave the terminal approved and the cardholder refunded, so it is not; nor while
        this instance is queuing that reversal (retries included). The row stays locked
        until the replay's delivery is known (`Store.hold_for_replay`): an instance queuing
        the reversal meanwhile waits, then finds the replay noted if it got through, and
        goes ahead if it did not. Other content given the approval (`on_conflict: replay`)
        is no delivery of the original's: it is only checked. A row that stays locked
        (another instance at it) is not waited for past most of store.timeout: the repeat
        gets 96. If the journal cannot tell, the approval is replayed, as it always was."""
        if not decisions.reversible_approval(Mti.parse(claim.mti), recorded.rc or ""):
            return True, None
        try:
            hold = await journal.store.hold_for_replay(claim.key)
        except StoreUnavailable as error:
            log.warning("%s replayed unchecked for a reversal (%s)", claim.mti, error)
            return claim.key not in self._reversing, None
        if hold is None:  # a reversal was queued, or the row stayed locked (one may be)
            return False, None
        # Looked at once the row is held: this instance's insert may have been under way.
        if claim.key in self._reversing or not same_content:
            await journal.store.release_hold(hold, delivered=False)
            return claim.key not in self._reversing, None
        return True, hold

    def _write_by(self, hold: ReplayHold | None) -> float | None:
        """When a replay holding its row must have been written: the hold is short, so that
        an instance queuing the original's reversal meanwhile waits within its timeout."""
        if hold is None or self._journal is None:
            return None
        return trio.current_time() + self._journal.store.replay_write_bound

    async def _poll(self, key: str, journal: Journal) -> Recorded | None:
        """The outcome of a transaction another instance carries, once the journal has it."""
        with trio.move_on_after(journal.join_timeout):
            while True:
                try:
                    recorded = await journal.store.recorded(key)
                except StoreUnavailable:
                    recorded = None
                if recorded is not None and recorded.completed:
                    return recorded
                await trio.sleep(JOIN_POLL)
        return None

    async def _send(
        self,
        message: Message,
        claim: Claim | None,
        switch: str | None,
        choose: Chooser | None,
        started: float,
    ) -> Answered:
        """Forward to `switch` (None: any). With `choose` (the claim names the switch it
        chose), when that switch cannot take it (no usable link, drained, or its spec
        cannot carry it), the next one `choose` gives, within the same deadline; the claim
        is re-pointed first, so that the journal names the switch a request is written to
        before any byte goes there. A claim that names no switch is not forwarded."""
        key = match_key(message, self._match_fields)
        tag = claim.key if claim is not None else None
        if choose is None:
            return await self._pool.forward(message, key, tag=tag, switch=switch, started=started)
        assert claim is not None
        tried: list[str] = []
        unencodable: UnencodableMessage | None = None
        linkless = False  # some switch tried had no usable link, or none could be named
        while switch is not None:
            try:
                return await self._pool.forward(
                    message, key, tag=tag, switch=switch, started=started, chosen=True
                )
            except NoLinkAvailable:
                linkless = True
            except UnencodableMessage as refused:
                unencodable = refused
            tried.append(switch)
            switch = choose(tried)
            if switch is None:
                break
            if trio.current_time() >= started + self._pool.switches[switch].timeout or (
                not await self._reassigned(claim, switch)
            ):
                linkless = True
                break
            log.info("%s: %s cannot take it; to %s", message.mti, tried[-1], switch)
        if unencodable is not None and not linkless:  # no switch's spec can carry it
            raise unencodable
        raise NoLinkAvailable("no switch link could take the request")

    async def _reassigned(self, claim: Claim, switch: str) -> bool:
        """Whether the journal now names `switch` for `claim` (else it may not go there)."""
        assert self._journal is not None
        try:
            return await self._journal.store.reassign(claim.key, switch)
        except StoreUnavailable as error:
            log.warning("%s not re-pointed at %s (%s)", claim.mti, switch, error)
            return False

    async def _original_switch(self, message: Message, journal: Journal) -> str | None:
        """For a terminal's reversal, the switch that handled the original (field 90), so
        the reversal reaches the switch that may have approved it; None: the normal choice."""
        if message.mti.message_class != decisions.REVERSAL:
            return None
        key = journal.identity.original_key(message, journal.clock())
        if key is None:
            return None
        try:
            original = await journal.store.recorded(key)
        except StoreUnavailable:
            return None
        if original is None or original.switch not in self._pool.switches:
            return None
        return original.switch

    async def _forward(
        self,
        message: Message,
        claim: Claim | None,
        switch: str | None = None,
        *,
        choose: Chooser | None = None,
    ) -> tuple[Message, Outcome | None]:
        started = trio.current_time()
        try:
            answered = await self._send(message, claim, switch, choose, started)
        except ProxyError as error:
            rc = decisions.failure_rc(error, self._timeout_rc)
            elapsed = (trio.current_time() - started) * 1000
            switch_name = error.switch if isinstance(error, UpstreamError) else None
            self.transactions[(switch_name or "", message.mti.code, rc)] += 1
            if isinstance(error, UpstreamTimeout) and switch_name:
                self.timeouts[switch_name] += 1
            _log_outcome(message, rc, str(error), elapsed)
            response = answer(message, rc)
            if claim is None or self._journal is None:
                return response, None
            state = decisions.failure_state(error)
            switch = error.switch if isinstance(error, UpstreamError) else None
            reversal = None
            if state == "timed_out" and decisions.reverse_after_timeout(message.mti):
                reversal = reversal_for(
                    claim.fields, claim.mti, self._journal.reversal.message, self._journal.clock()
                )
            outcome = outcome_of(
                claim, response, state=state, switch=switch, latency_ms=elapsed, reversal=reversal
            )
            return response, outcome
        elapsed = (trio.current_time() - started) * 1000
        rc = answered.response.get("39") or ""
        self.transactions[(answered.switch, message.mti.code, rc)] += 1
        self.upstream_latency[(answered.switch, message.mti.code)].observe(elapsed / 1000)
        _log_outcome(message, rc, answered.switch, elapsed)
        if claim is None:
            return answered.response, None
        outcome = outcome_of(
            claim,
            answered.response,
            state="answered",
            switch=answered.switch,
            link=answered.link,
            latency_ms=elapsed,
        )
        return answered.response, outcome


def _as_recorded(claim: Claim, outcome: Outcome) -> Recorded:
    return Recorded(
        fingerprint=claim.fingerprint,
        state=outcome.state,
        rc=outcome.rc,
        response_mti=outcome.response_mti,
        fields=outcome.fields,
        field_names=outcome.field_names,
    )


def _log_outcome(message: Message, rc: str, note: str, elapsed_ms: float) -> None:
    """One line per transaction: MTI, key fields, masked PAN, RC, switch or reason, latency."""
    if not log.isEnabledFor(logging.INFO):  # nothing to format on the hot path
        return
    pan = message.get("2")
    log.info(
        "%s stan=%r tid=%r pan=%s rc=%r (%s) %.1fms",
        message.mti,
        message.get("11"),
        message.get("41"),
        mask_pan(pan) if pan else "-",
        rc,
        note,
        elapsed_ms,
    )
