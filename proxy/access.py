"""Who may connect, what each client may send, and how fast.

A client is matched to the first profile whose networks hold its source address and whose
`cert_cn` names its certificate (subject CN or a DNS SAN); a profile may ask for either or
both. A connection that matches no profile is closed before it can send anything. With no
profiles configured only loopback clients are let in, allowed any message type.

Limits are per source (an IPv4 address, an IPv6 /64): a connection cap, and a token bucket
per profile that every connection of that source shares, so opening more connections, or
reconnecting, buys no more rate. New requests spend tokens; repeats, reversals and advices
do not (see `spends_token`).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from codec import Mti
from proxy.config import ClientProfile, RateLimit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Source = ipaddress.IPv4Address | ipaddress.IPv6Network
REVERSAL_CLASS = 4

LOOPBACK_ONLY = ClientProfile(
    name="loopback",
    networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
    cert_cn=None,
    allow=None,
    rate=None,
    rate_rc="91",
)

NOT_PERMITTED = "58"  # transaction not permitted to terminal


class Rejection(StrEnum):
    """Why the proxy refused a connection or a message (a bounded metric label)."""

    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
    NO_PROFILE = "no_profile"
    TLS_HANDSHAKE = "tls_handshake"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    FRAME_TIMEOUT = "frame_timeout"
    BAD_FRAME = "bad_frame"  # a broken or oversized length prefix: connection closed
    UNDECODABLE = "undecodable"  # no MTI, 11 and 41 to answer: connection closed
    FORMAT_ERROR = "format_error"  # answered RC 30
    NOT_PERMITTED = "not_permitted"  # answered RC 58
    RATE_LIMITED = "rate_limited"  # answered with the profile's rate_rc
    RESPONSE_FROM_TERMINAL = "response_from_terminal"  # dropped
    WRITE_TIMEOUT = "write_timeout"  # the terminal stopped reading its answers


def address_of(host: str) -> Address:
    """A peer's address as profiles see it (an IPv4-mapped IPv6 address is IPv4)."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def effective(profiles: tuple[ClientProfile, ...]) -> tuple[ClientProfile, ...]:
    """The profiles in force: the configured ones, else loopback only."""
    return profiles or (LOOPBACK_ONLY,)


def may_match(profiles: Iterable[ClientProfile], address: Address) -> bool:
    """Whether any profile could take this address (before a certificate is seen)."""
    return any(_in_networks(profile, address) for profile in profiles)


def match(
    profiles: Iterable[ClientProfile], address: Address, cert_names: frozenset[str]
) -> ClientProfile | None:
    """The first profile that takes this client, or None."""
    for profile in profiles:
        if _in_networks(profile, address) and (
            profile.cert_cn is None or profile.cert_cn in cert_names
        ):
            return profile
    return None


def permits(profile: ClientProfile, mti: Mti) -> bool:
    """Whether the profile may send this request (a repeat goes with its original)."""
    return profile.allow is None or mti.original().code in profile.allow


def spends_token(mti: Mti) -> bool:
    """Whether a request counts against its client's rate: new requests do; repeats,
    reversals and advices never wait on a rate (refusing one could leave a cardholder
    charged for a transaction the terminal took as failed)."""
    return not (mti.is_repeat or mti.is_advice or mti.message_class == REVERSAL_CLASS)


def source_of(address: Address) -> Source:
    """What limits count by: an IPv4 address, or the /64 an IPv6 address is in."""
    if isinstance(address, ipaddress.IPv6Address):
        return ipaddress.IPv6Network((address, 64), strict=False)
    return address


def _in_networks(profile: ClientProfile, address: Address) -> bool:
    return not profile.networks or any(address in network for network in profile.networks)


class TokenBucket:
    """`rate.tps` tokens a second up to `rate.burst`; starts full."""

    def __init__(self, rate: RateLimit, now: float) -> None:
        self._rate = rate
        self._tokens = float(rate.burst)
        self._at = now

    def full_at(self) -> float:
        """When the bucket will be full, if nothing more is taken."""
        return self._at + (self._rate.burst - self._tokens) / self._rate.tps

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        elapsed = max(0.0, now - self._at)
        self._tokens = min(float(self._rate.burst), self._tokens + elapsed * self._rate.tps)
        self._at = now
        if self._tokens >= 1.0 - 1e-9:  # requests exactly at the rate: float rounding
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False


@dataclass(slots=True)
class _Source:
    connections: int = 0
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def settled_at(self) -> float:
        """When every bucket is full again (the source is as good as new)."""
        return max((bucket.full_at() for bucket in self.buckets.values()), default=0.0)


class Admission:
    """Connection counts (total and per source) and the rate buckets.

    A source is an IPv4 address or an IPv6 /64 (one host's usual share). Its buckets
    outlive its connections until they are full again, so reconnecting buys no tokens;
    at most `max_connections` such resting sources are kept (the oldest go first).
    """

    def __init__(self, max_connections: int, max_per_source: int) -> None:
        self._max = max_connections
        self._max_per_source = max_per_source
        self._sources: dict[Source, _Source] = {}  # with connections open
        self._resting: OrderedDict[Source, _Source] = OrderedDict()
        self.connections = 0

    def admit(self, address: Address, now: float) -> Rejection | None:
        """Count a new connection in, or say why not."""
        if self.connections >= self._max:
            return Rejection.MAX_CONNECTIONS
        key = source_of(address)
        source = self._sources.get(key) or self._resting.pop(key, None) or _Source()
        if source.connections >= self._max_per_source:
            return Rejection.MAX_CONNECTIONS_PER_IP
        source.connections += 1
        self._sources[key] = source
        self.connections += 1
        self._forget(now)
        return None

    def release(self, address: Address, now: float) -> None:
        """A connection admitted from `address` closed."""
        key = source_of(address)
        source = self._sources[key]
        source.connections -= 1
        self.connections -= 1
        if not source.connections:
            del self._sources[key]
            if source.settled_at() > now:
                self._resting[key] = source
                self._forget(now)

    def allow(self, address: Address, profile: ClientProfile, now: float) -> bool:
        """Whether a request from an admitted `address` under `profile` is within its rate."""
        if profile.rate is None:
            return True
        buckets = self._sources[source_of(address)].buckets
        bucket = buckets.get(profile.name)
        if bucket is None:
            bucket = buckets[profile.name] = TokenBucket(profile.rate, now)
        return bucket.take(now)

    def _forget(self, now: float) -> None:
        while self._resting and (
            len(self._resting) > self._max or next(iter(self._resting.values())).settled_at() <= now
        ):
            self._resting.popitem(last=False)
