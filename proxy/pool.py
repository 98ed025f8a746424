"""The pool: every switch's links, the choice among them, and the wait for each answer."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import trio

from codec import CodecError, Message
from proxy import decisions
from proxy.balancer import RoundRobin
from proxy.config import SwitchConfig
from proxy.correlator import Correlator
from proxy.errors import (
    LinkLost,
    MissingKeyField,
    NoLinkAvailable,
    NotWritten,
    UnencodableMessage,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.keys import MatchKey, match_key
from proxy.upstream import Link, LinkState

log = logging.getLogger("iso_proxy.upstream")


class _Waiter:
    """Where a request waits for its answer (or for the news that its link died)."""

    __slots__ = ("error", "event", "response")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Message | None = None
        self.error: UpstreamError | None = None

    def deliver(self, response: Message) -> None:
        self.response = response
        self.event.set()

    def fail(self, error: UpstreamError) -> None:
        self.error = error
        self.event.set()


class Pool:
    """Switches and their links; forwards a request and returns the switch's answer."""

    def __init__(
        self,
        switches: Sequence[SwitchConfig],
        match_fields: tuple[str, ...],
        rng: random.Random,
    ) -> None:
        self._match_fields = match_fields
        self._correlator: Correlator[_Waiter] = Correlator()
        self.links: dict[str, list[Link]] = {
            switch.name: [
                Link(switch, index, self._on_response, self._on_state, rng)
                for index in range(switch.connections)
            ]
            for switch in switches
        }
        self._switch_turns: RoundRobin[str] = RoundRobin()
        self._link_turns: dict[str, RoundRobin[Link]] = {name: RoundRobin() for name in self.links}
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every link; ready once each has made its first connection attempt."""
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:
                for links in self.links.values():
                    for link in links:
                        starting.start_soon(nursery.start, link.run)
            task_status.started()

    def up_links(self) -> list[Link]:
        return [link for links in self.links.values() for link in links if link.is_up]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds; it is checked after every link state change."""
        while not condition():
            await self._changed.wait()

    async def forward(self, message: Message, key: MatchKey) -> Message:
        """Send `message` over a healthy link and return the switch's answer.

        One deadline, the chosen switch's `timeout` from now, bounds the whole request:
        waiting to write, writing, and waiting for the answer. Raises KeyInFlight,
        NoLinkAvailable, LinkLost, UpstreamTimeout or UnencodableMessage.
        """
        started = trio.current_time()
        waiter = _Waiter()
        self._correlator.open(key, waiter)
        timed_out: Link | None = None
        try:
            link, deadline = await self._send(message, key, waiter, started)
            with trio.move_on_at(deadline):
                await waiter.event.wait()
            if waiter.error is not None:
                raise waiter.error
            if waiter.response is None:
                timed_out = link
                raise UpstreamTimeout(f"no answer from {link.switch.name} in time")
            return waiter.response
        finally:
            # Written but unanswered (timed out, or this task was cancelled): the key stays
            # taken until the late answer or the connection's end.
            self._correlator.finish(key, waiter, answered=waiter.event.is_set())
            if timed_out is not None:
                self._recycle_if_stale(timed_out)

    async def _send(
        self, message: Message, key: MatchKey, waiter: _Waiter, started: float
    ) -> tuple[Link, float]:
        tried = unencodable = 0
        for link in self._candidates():
            tried += 1
            deadline = started + link.switch.timeout
            claim = partial(
                self._correlator.claim_write, key, waiter, limit=link.switch.max_inflight
            )
            try:
                await link.send(message, deadline=deadline, before_write=claim)
            except NotWritten:  # down, full, or no turn before the deadline: try the next
                continue
            except CodecError:  # this switch's spec cannot carry it; another's may
                unencodable += 1
                continue
            return link, deadline
        if tried and unencodable == tried:
            raise UnencodableMessage("request does not fit any available switch's spec")
        raise NoLinkAvailable("no switch link could take the request")

    def _recycle_if_stale(self, link: Link) -> None:
        stale = self._correlator.stale(link.connection)
        if decisions.should_recycle(stale, link.switch.max_inflight):
            log.warning("link %s: too many unanswered requests; reconnecting", link.name)
            link.recycle()

    def _candidates(self) -> Iterator[Link]:
        """Every up link: first one per switch, switches in turn, then the rest.

        Lazy, so a switch's own turn moves on only when one of its links is offered.
        """
        per_switch = {
            name: up
            for name, links in self.links.items()
            if (up := [link for link in links if link.is_up and not self._full(link)])
        }
        others: list[Link] = []
        for name in self._switch_turns.order(list(per_switch)):
            first, *rest = self._link_turns[name].order(per_switch[name])
            others.extend(rest)
            yield first
        yield from others

    def _full(self, link: Link) -> bool:
        return self._correlator.in_flight(link.connection) >= link.switch.max_inflight

    def _on_response(self, link: Link, response: Message) -> None:
        try:
            key = match_key(response, self._match_fields)
        except MissingKeyField:
            match = None
        else:
            match = self._correlator.resolve(link.connection, key)
        if match is None:
            log.warning("link %s: %s answer matches no request; dropped", link.name, response.mti)
        elif match.late:
            log.warning("link %s: late %s answer; not delivered", link.name, response.mti)
        else:
            match.waiter.deliver(response)

    def _on_state(self, link: Link) -> None:
        if link.state is LinkState.DOWN:
            for waiter in self._correlator.fail_connection(link.connection):
                waiter.fail(LinkLost(f"link {link.name} lost with the request in flight"))
        self._changed.set()
        self._changed = trio.Event()
