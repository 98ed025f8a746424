"""The correlator: which waiting request does a switch's answer belong to?

A switch answers on the connection the request went out on, in any order, and identifies
the request only by its fields. We match by a jPOS-style key (see `proxy.keys`): the MTI
mapped so that 0200, 0201 and 0210 meet, plus the terminal (41) and STAN (11) by default.

The rule for two requests with the same key: **the second is refused, never sent**. The
proxy is transparent (it does not rewrite STANs, which belong to the acquirer's audit
trail and to later reversals), so two requests with one key in flight at once could not
be told apart by their answers. With the default key both come from the same terminal
with the same STAN: that is a duplicate transmission, answered RC 94 by the caller. The
key is unique across the whole pool, not per link, so a duplicate can never slip out
through a second link either.

Lifecycle of one request:

    open(key, waiter)      before anything is sent: claims the key, or raises KeyInFlight
    bind(key, link, limit) the link chosen to carry it (again on failover, before any write)
    resolve(link, key)     an answer arrived on `link`: returns the waiter once, then forgets
    fail_link(link)        the link died: returns every waiter bound to it, and forgets them
    close(key, waiter)     the caller is done (answered, timed out or failed); idempotent,
                           and it never touches a newer request that reused the key

An answer is accepted only from the link the request was bound to; a second answer for the
same key finds nothing (a duplicate response is delivered once). Answers that match nothing
are the caller's to count as unmatched or late. The number of open requests per link is
bounded: `bind` raises LinkFull beyond the link's limit, which the caller treats like a busy link.
"""

from __future__ import annotations

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


class Correlator(Generic[W]):
    """Pool-wide table of requests in flight, keyed by match key."""

    def __init__(self) -> None:
        self._entries: dict[MatchKey, _Entry[W]] = {}
        self._per_link: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, key: MatchKey, waiter: W) -> None:
        if key in self._entries:
            raise KeyInFlight("a request with this key is already in flight")
        self._entries[key] = _Entry(waiter)

    def bind(self, key: MatchKey, link: str, limit: int) -> None:
        entry = self._entries[key]
        if entry.link == link:
            return
        if self._per_link[link] >= limit:
            raise LinkFull(f"link {link} has {limit} requests in flight")
        self._unbind(entry)
        entry.link = link
        self._per_link[link] += 1

    def resolve(self, link: str, key: MatchKey) -> W | None:
        entry = self._entries.get(key)
        if entry is None or entry.link != link:
            return None
        del self._entries[key]
        self._unbind(entry)
        return entry.waiter

    def fail_link(self, link: str) -> list[W]:
        failed = [key for key, entry in self._entries.items() if entry.link == link]
        waiters = [self._entries.pop(key).waiter for key in failed]
        self._per_link.pop(link, None)
        return waiters

    def close(self, key: MatchKey, waiter: W) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.waiter is waiter:
            del self._entries[key]
            self._unbind(entry)

    def in_flight(self, link: str) -> int:
        return self._per_link[link]

    def _unbind(self, entry: _Entry[W]) -> None:
        if entry.link is not None:
            self._per_link[entry.link] -= 1
            if self._per_link[entry.link] <= 0:
                del self._per_link[entry.link]
            entry.link = None
