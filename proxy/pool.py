"""The pool: every switch's links, the choice among them, and the wait for each answer."""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import trio

from codec import CodecError, Message
from proxy import decisions
from proxy.balancer import LeastCost, RoundRobin, SmoothWeighted
from proxy.config import HealthConfig, RoutingConfig, SwitchConfig
from proxy.correlator import Correlator
from proxy.deadlines import Deadlines
from proxy.errors import (
    LinkLost,
    MissingKeyField,
    NoLinkAvailable,
    NotWritten,
    UnencodableMessage,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.health import LinkState
from proxy.keys import MatchKey, match_key
from proxy.network import StanSequence
from proxy.upstream import WRITE_GRACE, Dialer, Link, dial_tcp
from proxy.watch import Watch

log = logging.getLogger("iso_proxy.upstream")

# A request's choice of switch, given the switches already tried (`Pool.choosing`).
Chooser = Callable[[Collection[str]], str | None]


@dataclass(frozen=True, slots=True)
class Answered:
    """A switch's answer, and who gave it."""

    response: Message
    switch: str
    link: str


@dataclass(frozen=True, slots=True)
class LateAnswer:
    """An answer that came after its request's deadline: recorded, never delivered."""

    tag: str
    response: Message
    latency_ms: float


# Late answers waiting to be recorded; beyond this they are only logged.
MAX_LATE_ANSWERS = 1000


class _Waiter:
    """Where a request waits for its answer (or for the news that its link died)."""

    __slots__ = ("connection", "error", "event", "response", "tag", "written_at")

    def __init__(self, tag: str | None) -> None:
        self.event = trio.Event()
        self.response: Message | None = None
        self.error: UpstreamError | None = None
        self.connection = ""
        self.written_at = 0.0
        self.tag = tag  # the caller's name for the request (its transaction key)

    @property
    def settled(self) -> bool:
        """Answered, or its connection failed (not merely past its deadline)."""
        return self.response is not None or self.error is not None

    def deliver(self, response: Message) -> None:
        self.response = response
        self.event.set()

    def fail(self, error: UpstreamError) -> None:
        self.error = error
        self.event.set()


def _no_answer(waiter: _Waiter) -> None:
    """A written request's deadline passed: its caller wakes to no answer (a timeout)."""
    waiter.event.set()


class Choices:
    """The context of `Pool.choosing` (a class: a generator's context manager costs the
    hot path a dozen calls)."""

    __slots__ = ("_choose", "_chosen", "_held")

    def __init__(self, choose: Chooser, chosen: Counter[str]) -> None:
        self._choose = choose
        self._chosen = chosen  # the pool's count of requests each switch was chosen for
        self._held: list[str] = []

    def __enter__(self) -> Chooser:
        return self.choose

    def __exit__(self, *_: object) -> None:
        chosen = self._chosen
        for name in self._held:
            if chosen[name] > 1:
                chosen[name] -= 1
            else:
                del chosen[name]
        self._held.clear()

    def choose(self, exclude: Collection[str]) -> str | None:
        name = self._choose(exclude)
        if name is not None:
            self._chosen[name] += 1
            self._held.append(name)
        return name


class Pool:
    """Switches and their links; forwards a request and returns the switch's answer."""

    def __init__(
        self,
        switches: Sequence[SwitchConfig],
        health: HealthConfig,
        routing: RoutingConfig,
        rng: random.Random,
        dial: Dialer = dial_tcp,
    ) -> None:
        self._match_fields = routing.match_key
        self._strategy = routing.strategy
        self._correlator: Correlator[_Waiter] = Correlator()
        self._health = health
        self._rng = rng
        self._dial = dial
        self._stans = StanSequence(rng.randrange(1, 1_000_000))
        self.switches: dict[str, SwitchConfig] = {}
        self.links: dict[str, list[Link]] = {}
        self._link_turns: dict[str, RoundRobin[Link]] = {}
        self._running: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        for switch in switches:
            if switch.enabled:
                self._register(switch)
        self._switch_turns: RoundRobin[str] = RoundRobin()
        self._weighted: SmoothWeighted[str] = SmoothWeighted()
        self._least_cost: LeastCost[Link] = LeastCost()  # links, as a request is written
        self._least_cost_switch: LeastCost[Link] = LeastCost()  # a switch chosen before
        self._chosen: Counter[str] = Counter()  # requests whose switch is chosen (`choosing`)
        self._changed = Watch()  # a link's state changed
        self._settled = Watch()  # a request ended
        self.drained: set[str] = set()  # switches taking no new requests (echoes go on)
        self.removing: dict[str, trio.Event] = {}  # switches being removed: set once gone
        self._late_send, self.late_answers = trio.open_memory_channel[LateAnswer](MAX_LATE_ANSWERS)
        # Each written request's deadline for its answer, on one timer (not a scope each).
        self._answer_deadlines: Deadlines[_Waiter] = Deadlines(_no_answer)
        self.late_count = 0
        self.unmatched_count = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every link; ready once each has made its first connection attempt."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._answer_deadlines.run)
            async with trio.open_nursery() as starting:
                for name in list(self.links):
                    starting.start_soon(
                        nursery.start, self._run_switch, self._running[name], self.links[name]
                    )
            task_status.started()

    def add_switch(self, switch: SwitchConfig) -> None:
        """Start using a switch (links connect and come up on their echoes)."""
        assert self._nursery is not None, "the pool is not running"
        self._register(switch)
        self._nursery.start_soon(
            self._run_switch, self._running[switch.name], self.links[switch.name]
        )

    def update_switch(self, switch: SwitchConfig) -> None:
        """New settings that need no reconnect (weight, timeouts, limits) for a switch."""
        self.switches[switch.name] = switch
        for link in self.links[switch.name]:
            link.switch = switch

    def remove_switch(self, name: str) -> trio.Event:
        """Stop using a switch: no new requests from now on; once those in flight are done
        (or their deadline passed), its links sign off and close. The event is set once
        it is gone. A removal already under way is not repeated; an unknown switch is
        left alone (the event already set)."""
        assert self._nursery is not None, "the pool is not running"
        if name in self.removing:
            return self.removing[name]
        gone = trio.Event()
        if name not in self.switches:
            gone.set()
            return gone
        self.removing[name] = gone
        self.drained.add(name)
        self._nursery.start_soon(self._remove, name, gone)
        return gone

    async def _remove(self, name: str, gone: trio.Event) -> None:
        try:
            switch = self.switches[name]
            with trio.move_on_after(switch.timeout + WRITE_GRACE):
                await self.wait_until_idle(name)
            self._running.pop(name).cancel()
            del self.switches[name], self.links[name], self._link_turns[name]
            self.drained.discard(name)
        finally:
            del self.removing[name]
            gone.set()

    async def wait_until_idle(self, name: str) -> None:
        """Wait until no request written to `name`'s links is waiting for its answer."""
        links = self.links[name]
        await self._settled.wait_until(lambda: not any(self.in_flight(link) for link in links))

    def _register(self, switch: SwitchConfig) -> None:
        self.switches[switch.name] = switch
        self.links[switch.name] = [
            Link(
                switch, index, self._health, self._stans, self._on_response, self._on_state,
                self._rng, self._dial,
            )
            for index in range(switch.connections)
        ]  # fmt: skip
        self._link_turns[switch.name] = RoundRobin()
        # Its links' scope from now on, so that a removal can end them before they start.
        self._running[switch.name] = trio.CancelScope()

    async def _run_switch(
        self,
        scope: trio.CancelScope,
        links_of_switch: list[Link],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a switch's links inside its scope (already cancelled if it was removed
        before this task began)."""
        with scope:
            async with trio.open_nursery() as links:
                async with trio.open_nursery() as starting:
                    for link in links_of_switch:
                        starting.start_soon(links.start, link.run)
                task_status.started()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds; it is checked after every link state change."""
        await self._changed.wait_until(condition)

    async def forward(
        self,
        message: Message,
        key: MatchKey,
        *,
        tag: str | None = None,
        switch: str | None = None,
        judge_link: bool = True,
        started: float | None = None,
        chosen: bool = False,
    ) -> Answered:
        """Send `message` over a healthy link and return the switch's answer.

        One deadline, the chosen switch's `timeout` from `started` (default now), bounds
        the whole request: waiting to write, writing, and waiting for the answer. With
        `switch`, only that switch's links are used. An answer arriving after the deadline
        goes to `late_answers` under `tag`; `chosen`: `switch` came from `choosing`, so a
        drain since counts. Raises KeyInFlight, NoLinkAvailable, LinkLost,
        UpstreamTimeout or UnencodableMessage. The answer's deadline is kept by `run`'s
        timer (within 10 ms): the pool must be running.
        """
        if started is None:
            started = trio.current_time()
        waiter = _Waiter(tag)
        self._correlator.open(key, waiter, tag)
        timed_out: Link | None = None
        try:
            link, deadline = await self._send(message, key, waiter, started, switch, chosen)
            if trio.current_time() < deadline:  # else it is already late: no wait at all
                self._answer_deadlines.add(waiter, deadline)
                try:
                    await waiter.event.wait()  # an answer, its link's loss, or the deadline
                finally:
                    self._answer_deadlines.discard(waiter)
            if waiter.error is not None:
                raise waiter.error
            if waiter.response is None:
                timed_out = link
                raise UpstreamTimeout(
                    f"no answer from {link.switch.name} in time", switch=link.switch.name
                )
            if judge_link:
                link.transaction_done(
                    waiter.connection, answered=True, rtt=trio.current_time() - waiter.written_at
                )
            return Answered(waiter.response, link.switch.name, link.name)
        finally:
            # Written but unanswered (timed out, or this task was cancelled): the key stays
            # taken until the late answer or the connection's end.
            self._correlator.finish(key, waiter, answered=waiter.settled)
            self._settled.changed()
            if timed_out is not None:
                if judge_link:
                    timed_out.transaction_done(waiter.connection, answered=False, rtt=0.0)
                self._recycle_if_stale(timed_out)

    async def _send(
        self,
        message: Message,
        key: MatchKey,
        waiter: _Waiter,
        started: float,
        only: str | None,
        chosen: bool,
    ) -> tuple[Link, float]:
        tried: set[str] = set()
        unencodable = 0
        # The candidates are looked at afresh after each failure: a link that came up (or
        # reconnected) while this request waited for another is a fair next choice.
        candidates = partial(self._candidates, only, chosen)
        while link := next((c for c in candidates() if c.connection not in tried), None):
            tried.add(link.connection)
            deadline = started + link.switch.timeout
            claim = partial(self._claim, key, waiter, link.switch.max_inflight)
            try:
                await link.send(message, deadline=deadline, before_write=claim)
            except NotWritten:  # down, full, or no turn before the deadline: try the next
                continue
            except LinkLost:
                if waiter.response is None:
                    raise
                # Its frame went out whole and was answered before the rest of the same
                # write (other requests' frames) was lost: the answer stands.
            except CodecError:  # this switch's spec cannot carry it; another's may
                unencodable += 1
                continue
            return link, deadline
        if tried and unencodable == len(tried):
            raise UnencodableMessage("request does not fit any available switch's spec")
        raise NoLinkAvailable("no switch link could take the request")

    def _claim(
        self, key: MatchKey, waiter: _Waiter, limit: int, connection: str
    ) -> Callable[[], None]:
        self._correlator.claim_write(key, waiter, connection, limit)
        waiter.connection = connection
        waiter.written_at = trio.current_time()
        return partial(self._unclaim, key, waiter, connection)

    def _unclaim(self, key: MatchKey, waiter: _Waiter, connection: str) -> None:
        """The write failed with no byte of the request written: it may go elsewhere."""
        self._correlator.unclaim_write(key, waiter, connection)
        waiter.connection = ""

    def _recycle_if_stale(self, link: Link) -> None:
        stale = self._correlator.stale(link.connection)
        if decisions.should_recycle(stale, link.switch.max_inflight):
            log.warning("link %s: too many unanswered requests; reconnecting", link.name)
            link.recycle()

    def choosing(self) -> Choices:
        """A request's choices of switch: `choose(exclude)` is the switch it goes to next,
        by the strategy (its turn taken), leaving out `exclude`; None when no other switch
        has a usable link. The journal names it in the claim, then the request is
        forwarded to it alone (`forward(switch=..., chosen=True)`). Until the block ends,
        each choice counts as load on its switch for least_latency: requests chosen
        together, before any is written, spread as they would at write time."""
        return Choices(self._choose, self._chosen)

    def _choose(self, exclude: Collection[str]) -> str | None:
        usable = {n: up for n, up in self._usable().items() if n not in exclude}
        if self._strategy == "least_latency":
            links = [link for up in usable.values() for link in up]
            order = self._least_cost_switch.order(links, [self._cost(link) for link in links])
            return order[0].switch.name if order else None
        return next(iter(self._switch_order(list(usable))), None)

    def _usable(self, only: str | None = None, chosen: bool = False) -> dict[str, list[Link]]:
        """Each switch's usable links (up, not full); a drained switch only when asked
        for by name, and not chosen by the strategy (a terminal's reversal, or a queued
        one, still goes where its original went). Looked at twice a request: the checks
        are written out, not called."""
        in_flight = self._correlator.in_flight
        return {
            name: up
            for name, links in self.links.items()
            if (only is None or name == only)
            and (name not in self.drained or (only is not None and not chosen))
            and (
                up := [
                    link
                    for link in links
                    if link.state is LinkState.UP
                    and in_flight(link.connection) < link.switch.max_inflight
                ]
            )
        }

    def _switch_order(self, names: list[str]) -> list[str]:
        """`names` in the order the strategy prefers (round_robin, weighted): a turn taken."""
        if self._strategy == "weighted":
            return self._weighted.order(names, [self.switches[n].weight for n in names])
        return self._switch_turns.order(names)

    def _candidates(self, only: str | None = None, chosen: bool = False) -> Iterator[Link]:
        """Every usable link (up, not full), in the order the strategy prefers.

        By switch (round_robin, weighted): first one link of each switch, switches in the
        strategy's order and each switch's links in turn, then the rest. By link
        (least_latency): cheapest first. Lazy, so turns move on only when offered. For
        `only` one switch, whose turn `choosing` took, only its links take turns.
        """
        usable = self._usable(only, chosen)
        if self._strategy == "least_latency":
            links = [link for up in usable.values() for link in up]
            yield from self._least_cost.order(links, [self._cost(link) for link in links])
            return
        order = list(usable) if only is not None else self._switch_order(list(usable))
        others: list[Link] = []
        for name in order:
            first, *rest = self._link_turns[name].order(usable[name])
            others.extend(rest)
            yield first
        yield from others

    def _cost(self, link: Link) -> float:
        """Peak-EWMA round trip times the requests the link is already waiting on (and its
        share of those its switch was chosen for, not yet ended)."""
        name = link.switch.name
        chosen = self._chosen[name] / len(self.links[name]) if name in self._chosen else 0.0
        return (link.latency.value or 0.0) * (
            self._correlator.in_flight(link.connection) + chosen + 1
        )

    def in_flight(self, link: Link) -> int:
        """Requests written on `link`'s current connection and not yet answered."""
        return self._correlator.in_flight(link.connection)

    def _on_response(self, link: Link, response: Message) -> None:
        try:
            key = match_key(response, self._match_fields)
        except MissingKeyField:
            match = None
        else:
            match = self._correlator.resolve(link.connection, key)
        if match is None:
            log.warning("link %s: %s answer matches no request; dropped", link.name, response.mti)
            self.unmatched_count += 1
        elif match.late:
            log.warning("link %s: late %s answer; not delivered", link.name, response.mti)
            self.late_count += 1
            waiter = match.waiter
            if waiter.tag is not None:
                latency = (trio.current_time() - waiter.written_at) * 1000
                with contextlib.suppress(trio.WouldBlock):
                    self._late_send.send_nowait(LateAnswer(waiter.tag, response, latency))
        else:
            match.waiter.deliver(response)

    def _on_state(self, link: Link) -> None:
        if link.state is LinkState.DOWN:
            for waiter in self._correlator.fail_connection(link.connection):
                waiter.fail(
                    LinkLost(
                        f"link {link.name} lost with the request in flight",
                        switch=link.switch.name,
                    )
                )
        self._changed.changed()
