"""The pool: every switch's links, the choice among them, and the wait for each answer."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import trio

from codec import CodecError, Message
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

        Raises KeyInFlight, NoLinkAvailable, LinkLost, UpstreamTimeout or UnencodableMessage.
        """
        waiter = _Waiter()
        self._correlator.open(key, waiter)
        try:
            link = await self._send(message, key)
            with trio.move_on_after(link.switch.timeout):
                await waiter.event.wait()
            if waiter.error is not None:
                raise waiter.error
            if waiter.response is None:
                raise UpstreamTimeout(f"no answer from {link.switch.name} in time")
            return waiter.response
        finally:
            self._correlator.close(key, waiter)

    async def _send(self, message: Message, key: MatchKey) -> Link:
        for link in self._candidates():
            try:
                self._correlator.bind(key, link.name, link.switch.max_inflight)
                await link.send(message)
            except NotWritten:  # also LinkFull: try the next link
                continue
            except CodecError:
                raise UnencodableMessage(
                    f"request does not fit switch {link.switch.name}"
                ) from None
            return link
        raise NoLinkAvailable("no switch link is up")

    def _candidates(self) -> Iterator[Link]:
        """One up link per up switch, switches and links each taken in turn.

        Lazy, so a switch's own turn moves on only when one of its links is offered.
        """
        per_switch = {
            name: up
            for name, links in self.links.items()
            if (up := [link for link in links if link.is_up])
        }
        for name in self._switch_turns.order(list(per_switch)):
            yield self._link_turns[name].order(per_switch[name])[0]

    def _on_response(self, link: Link, response: Message) -> bool:
        try:
            key = match_key(response, self._match_fields)
        except MissingKeyField:
            return False
        waiter = self._correlator.resolve(link.name, key)
        if waiter is None:
            return False
        waiter.deliver(response)
        return True

    def _on_state(self, link: Link) -> None:
        if link.state is LinkState.DOWN:
            for waiter in self._correlator.fail_link(link.name):
                waiter.fail(LinkLost(f"link {link.name} lost with the request in flight"))
        self._changed.set()
        self._changed = trio.Event()
