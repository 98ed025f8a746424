"""Who may connect, what each client may send, and how fast.

A client is matched to the first profile whose networks hold its source address and whose
`cert_cn` names its certificate (subject CN or a DNS SAN); a profile may ask for either or
both. A connection that matches no profile is closed before it can send anything. With no
profiles configured only loopback clients are let in, allowed any message type.

Limits are per source address: a connection cap, and a token bucket per profile that every
connection of that address shares (so opening more connections buys no more rate). An
address's state lives as long as it has a connection open, so it is bounded by the
connection cap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from codec import Mti
from proxy.config import ClientProfile, RateLimit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

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


def _in_networks(profile: ClientProfile, address: Address) -> bool:
    return not profile.networks or any(address in network for network in profile.networks)


class TokenBucket:
    """`rate.tps` tokens a second up to `rate.burst`; starts full."""

    def __init__(self, rate: RateLimit, now: float) -> None:
        self._rate = rate
        self._tokens = float(rate.burst)
        self._at = now

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


class Admission:
    """Connection counts (total and per source address) and the rate buckets."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self._max = max_connections
        self._max_per_address = max_per_address
        self._sources: dict[Address, _Source] = {}
        self.connections = 0

    def admit(self, address: Address) -> Rejection | None:
        """Count a new connection in, or say why not."""
        if self.connections >= self._max:
            return Rejection.MAX_CONNECTIONS
        source = self._sources.setdefault(address, _Source())
        if source.connections >= self._max_per_address:
            return Rejection.MAX_CONNECTIONS_PER_IP
        source.connections += 1
        self.connections += 1
        return None

    def release(self, address: Address) -> None:
        """A connection admitted from `address` closed."""
        source = self._sources[address]
        source.connections -= 1
        self.connections -= 1
        if not source.connections:
            del self._sources[address]

    def allow(self, address: Address, profile: ClientProfile, now: float) -> bool:
        """Whether a request from an admitted `address` under `profile` is within its rate."""
        if profile.rate is None:
            return True
        buckets = self._sources[address].buckets
        bucket = buckets.get(profile.name)
        if bucket is None:
            bucket = buckets[profile.name] = TokenBucket(profile.rate, now)
        return bucket.take(now)
