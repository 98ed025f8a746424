"""The correlator: which waiting request does a switch's answer belong to?

A switch answers on the connection the request went out on, in any order, and identifies
the request only by its fields. We match by a jPOS-style key (see `proxy.keys`): the MTI
mapped so that 0200, 0201 and 0210 meet, plus the terminal (41) and STAN (11) by default.

The rule for two requests with the same key: **the second is refused, never sent**. The
proxy is transparent (it does not rewrite STANs, which belong to the acquirer's audit
trail and to later reversals), so two requests with one key in flight at once could not
be told apart by their answers. With the default key both come from the same terminal
with the same STAN: a duplicate transmission, answered RC 94 by the caller. The key is
unique across the whole pool, not per link, so a duplicate cannot slip out through a
second link either.

A request that timed out keeps its key as a *tombstone* until its late answer arrives,
its link dies, or the tombstone expires: otherwise the late answer would be handed to the
next request that reuses the key (the same terminal and STAN, another amount). A late
answer is reported as late and never delivered.

Lifecycle of one request (`waiter` is the caller's token for it):

    open(key, waiter, now)     claims the key, or raises KeyInFlight
    bind(key, waiter, link)    the link chosen to carry it; again on failover. LinkFull
                               when the link is at its limit (tombstones count)
    mark_sent(key, waiter)     called just before the first byte is written: from here on
                               the switch may have it, so it is never sent elsewhere
    resolve(link, key)         an answer arrived on `link`: the waiter (and whether it is
                               late) once, for a request marked sent on that link; else None
    fail_link(link)            the link died: the waiters of its sent requests; requests
                               bound but not sent are unbound, free to fail over
    finish(key, waiter, late_until=None)
                               the caller is done; with `late_until`, a sent request stays
                               as a tombstone until then. Never touches a newer request
    expire(now)                drops tombstones whose time is up
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.errors import KeyInFlight, NotWritten
from proxy.keys import MatchKey

W = TypeVar("W")


class LinkFull(NotWritten):
    """The link already carries its maximum of requests in flight."""


@dataclass(slots=True)
class _Entry(Generic[W]):
    waiter: W
    link: str | None = None
    sent: bool = False
    late_until: float | None = None


@dataclass(frozen=True, slots=True)
class Match(Generic[W]):
    waiter: W
    late: bool


class Correlator(Generic[W]):
    """Pool-wide table of requests in flight, keyed by match key."""

    def __init__(self) -> None:
        self._entries: dict[MatchKey, _Entry[W]] = {}
        self._per_link: Counter[str] = Counter()
        self._tombstones: list[tuple[float, int, MatchKey, _Entry[W]]] = []
        self._serial = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, key: MatchKey, waiter: W, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            if entry.late_until is None or entry.late_until > now:
                raise KeyInFlight("a request with this key is still in flight")
            self._remove(key)
        self._entries[key] = _Entry(waiter)

    def bind(self, key: MatchKey, waiter: W, link: str, limit: int) -> None:
        entry = self._own(key, waiter)
        if entry is None or entry.sent:
            raise NotWritten("the request is no longer waiting to be sent")
        if entry.link == link:
            return
        if self._per_link[link] >= limit:
            raise LinkFull(f"link {link} has {limit} requests in flight")
        self._unbind(entry)
        entry.link = link
        self._per_link[link] += 1

    def mark_sent(self, key: MatchKey, waiter: W) -> None:
        entry = self._own(key, waiter)
        if entry is not None:
            entry.sent = True

    def resolve(self, link: str, key: MatchKey) -> Match[W] | None:
        entry = self._entries.get(key)
        if entry is None or not entry.sent or entry.link != link:
            return None
        self._remove(key)
        return Match(entry.waiter, late=entry.late_until is not None)

    def fail_link(self, link: str) -> list[W]:
        failed: list[W] = []
        for key, entry in list(self._entries.items()):
            if entry.link != link:
                continue
            if not entry.sent:
                entry.link = None
                continue
            del self._entries[key]
            if entry.late_until is None:
                failed.append(entry.waiter)
        self._per_link.pop(link, None)
        return failed

    def finish(self, key: MatchKey, waiter: W, late_until: float | None = None) -> None:
        entry = self._own(key, waiter)
        if entry is None:
            return
        if late_until is not None and entry.sent and entry.link is not None:
            entry.late_until = late_until
            heapq.heappush(self._tombstones, (late_until, next(self._serial), key, entry))
        else:
            self._remove(key)

    def expire(self, now: float) -> None:
        while self._tombstones and self._tombstones[0][0] <= now:
            _, _, key, entry = heapq.heappop(self._tombstones)
            if self._entries.get(key) is entry:
                self._remove(key)

    def in_flight(self, link: str) -> int:
        return self._per_link[link]

    def _own(self, key: MatchKey, waiter: W) -> _Entry[W] | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.waiter is waiter else None

    def _remove(self, key: MatchKey) -> None:
        self._unbind(self._entries.pop(key))

    def _unbind(self, entry: _Entry[W]) -> None:
        if entry.link is not None:
            self._per_link[entry.link] -= 1
            if self._per_link[entry.link] <= 0:
                del self._per_link[entry.link]
            entry.link = None
