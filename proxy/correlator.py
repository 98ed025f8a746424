"""The correlator: which waiting request does a switch's answer belong to?

A switch answers on the connection the request went out on, in any order, and identifies
the request only by its fields. We match by a jPOS-style key (see `proxy.keys`): the MTI
mapped so that 0200, 0201 and 0210 meet, plus the terminal (41) and STAN (11) by default.

The rule for two requests with the same key: **the second is refused, never sent**. The
proxy is transparent (it does not rewrite STANs, which belong to the acquirer's audit
trail and to later reversals), so two requests with one key in flight at once could not
be told apart by their answers. With the default key both come from the same terminal
with the same STAN: a duplicate transmission, answered RC 94 by the caller. The key is
unique across the whole pool, not per connection, so a duplicate cannot slip out through a
second link either.

Requests are tied to a *connection* (one TCP connection of a link: a reconnect is a new
connection), never to a link name, so an answer or a failure of an old connection can
never be confused with the new one. A request is tied at the moment its first byte is
about to be written (`claim_write`, called as the write that carries it begins): before it
belongs to no connection and may fail over anywhere; after it, it may have reached the
switch, so it is never sent again.

A request that ends without its answer after being written (timed out, or its task was
cancelled) keeps its key as a *tombstone* until the late answer arrives or its connection
drops: otherwise the late answer would be handed to the next request reusing the key (the
same terminal and STAN, another amount). A late answer is reported as late, never
delivered. Tombstones count against the connection's limit; `stale` tells the caller how
many a connection holds, so it can recycle a connection that stopped answering.

    open(key, waiter, tag)                claims the key, or raises KeyInFlight (a tombstone
                                          of an earlier attempt with the same tag gives way)
    claim_write(key, waiter, conn, limit) just before the first byte: ties the request to
                                          `conn`; LinkFull at the limit, NotWritten if the
                                          request is no longer this waiter's to send
    unclaim_write(key, waiter, conn)      that write failed with no byte written: untied,
                                          free to go out on another connection
    resolve(conn, key)                    an answer arrived on `conn`: the waiter once (and
                                          whether it is late), else None
    fail_connection(conn)                 `conn` died: the waiters of its live requests;
                                          its tombstones are dropped
    finish(key, waiter, answered)         the caller is done; a written request without
                                          its answer stays as a tombstone. Never touches
                                          a newer request with the same key
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.errors import KeyInFlight, NotWritten
from proxy.keys import MatchKey

W = TypeVar("W")


class LinkFull(NotWritten):
    """The connection already carries its maximum of requests in flight."""


@dataclass(slots=True)
class _Entry(Generic[W]):
    waiter: W
    connection: str | None = None
    tombstone: bool = False
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class Match(Generic[W]):
    waiter: W
    late: bool


class Correlator(Generic[W]):
    """Pool-wide table of requests in flight, keyed by match key."""

    def __init__(self) -> None:
        self._entries: dict[MatchKey, _Entry[W]] = {}
        self._in_flight: Counter[str] = Counter()
        self._stale: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, key: MatchKey, waiter: W, tag: str | None = None) -> None:
        """Claim `key`. A tombstone left by an earlier attempt with the same `tag` (a
        repeat of the same reversal, say) gives way: any answer to either attempt serves."""
        entry = self._entries.get(key)
        if entry is not None:
            if not (entry.tombstone and tag is not None and entry.tag == tag):
                raise KeyInFlight("a request with this key is still in flight")
            self._remove(key, entry)
        self._entries[key] = _Entry(waiter, tag=tag)

    def claim_write(self, key: MatchKey, waiter: W, connection: str, limit: int) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.waiter is not waiter or entry.connection is not None:
            raise NotWritten("the request is no longer waiting to be sent")
        if self._in_flight[connection] >= limit:
            raise LinkFull(f"connection {connection} has {limit} requests in flight")
        entry.connection = connection
        self._in_flight[connection] += 1

    def unclaim_write(self, key: MatchKey, waiter: W, connection: str) -> None:
        """The write that was to carry the request failed before any byte left: it is no
        longer tied to `connection`, and may go out on another."""
        entry = self._entries.get(key)
        if (
            entry is None
            or entry.waiter is not waiter
            or entry.connection != connection
            or entry.tombstone  # its caller gave up on it already: it stays where it is
        ):
            return
        entry.connection = None
        self._in_flight[connection] -= 1
        if self._in_flight[connection] <= 0:
            del self._in_flight[connection]

    def resolve(self, connection: str, key: MatchKey) -> Match[W] | None:
        entry = self._entries.get(key)
        if entry is None or entry.connection != connection:
            return None
        self._remove(key, entry)
        return Match(entry.waiter, late=entry.tombstone)

    def fail_connection(self, connection: str) -> list[W]:
        failed: list[W] = []
        for key, entry in list(self._entries.items()):
            if entry.connection == connection:
                del self._entries[key]
                if not entry.tombstone:
                    failed.append(entry.waiter)
        self._in_flight.pop(connection, None)
        self._stale.pop(connection, None)
        return failed

    def finish(self, key: MatchKey, waiter: W, *, answered: bool) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.waiter is not waiter:
            return
        if answered or entry.connection is None:
            self._remove(key, entry)
        elif not entry.tombstone:
            entry.tombstone = True
            self._stale[entry.connection] += 1

    def in_flight(self, connection: str) -> int:
        """Requests written on `connection` and not yet answered (tombstones included)."""
        return self._in_flight[connection]

    def stale(self, connection: str) -> int:
        """Tombstones on `connection`: requests it never answered in time."""
        return self._stale[connection]

    def _remove(self, key: MatchKey, entry: _Entry[W]) -> None:
        del self._entries[key]
        if entry.connection is None:
            return
        for counter in (self._in_flight, self._stale) if entry.tombstone else (self._in_flight,):
            counter[entry.connection] -= 1
            if counter[entry.connection] <= 0:
                del counter[entry.connection]
