"""Client profiles, connection caps and the token bucket: the pure access rules."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codec import Mti
from proxy.access import (
    LOOPBACK_ONLY,
    Admission,
    Rejection,
    TokenBucket,
    address_of,
    effective,
    match,
    may_match,
    permits,
    spends_token,
)
from proxy.config import ClientProfile, RateLimit, parse_config

SWITCHES = [{"name": "a", "host": "127.0.0.1", "port": 7001}]


def profiles(*raw: dict[str, Any], tls: bool = True) -> tuple[ClientProfile, ...]:
    listen: dict[str, Any] = {}
    if tls:
        here = Path(__file__)
        listen["tls"] = {"cert": here.name, "key": here.name, "client_ca": here.name}
    config = parse_config(
        {"listen": listen, "clients": list(raw), "switches": SWITCHES},
        base_dir=Path(__file__).parent,
    )
    return config.clients


PROFILES = profiles(
    {"name": "noc", "networks": ["10.9.0.0/24"], "allow": ["0800"]},
    {"name": "atm", "cert_cn": "atm.bank.example", "allow": ["0200", "0400"]},
    {"name": "stores", "networks": ["10.0.0.0/8", "2001:db8::/32"], "allow": ["0200"]},
    {"name": "vip", "networks": ["192.0.2.0/24"], "cert_cn": "vip.example"},
)


@pytest.mark.parametrize(
    ("address", "names", "expected"),
    [
        ("10.9.0.7", set(), "noc"),  # first match wins: noc before stores
        ("10.1.2.3", set(), "stores"),
        ("10.1.2.3", {"atm.bank.example"}, "atm"),  # a certificate profile listed earlier
        ("2001:db8::1", set(), "stores"),
        ("172.16.0.1", {"atm.bank.example"}, "atm"),  # any network, by certificate
        ("172.16.0.1", {"other.example"}, None),
        ("192.0.2.9", set(), None),  # vip needs both its network and its certificate
        ("192.0.2.9", {"vip.example"}, "vip"),
        ("198.51.100.1", {"vip.example"}, None),
        ("::ffff:10.1.2.3", set(), "stores"),  # IPv4-mapped IPv6 is the IPv4 address
    ],
)
def test_the_first_profile_that_takes_a_client_wins(
    address: str, names: set[str], expected: str | None
) -> None:
    found = match(PROFILES, address_of(address), frozenset(names))
    assert (found.name if found else None) == expected


def test_an_address_no_profile_could_take_is_known_before_any_handshake() -> None:
    only_networks = profiles({"name": "stores", "networks": ["10.0.0.0/8"]}, tls=False)
    assert may_match(only_networks, address_of("10.0.0.1"))
    assert not may_match(only_networks, address_of("192.0.2.1"))
    assert may_match(PROFILES, address_of("192.0.2.1"))  # a certificate may still match


def test_without_profiles_only_loopback_is_let_in_with_any_message() -> None:
    assert effective(()) == (LOOPBACK_ONLY,)
    for address, admitted in (("127.0.0.1", True), ("127.8.9.1", True), ("::1", True)):
        assert (match(effective(()), address_of(address), frozenset()) is not None) == admitted
    assert match(effective(()), address_of("10.0.0.1"), frozenset()) is None
    assert permits(LOOPBACK_ONLY, Mti.parse("0300"))


@pytest.mark.parametrize(
    ("mti", "allowed"),
    [("0200", True), ("0201", True), ("0400", True), ("0401", True), ("0100", False),
     ("0800", False), ("0420", False), ("0220", False)],
)  # fmt: skip
def test_a_repeat_is_allowed_with_its_original_and_nothing_else_is(mti: str, allowed: bool) -> None:
    atm = PROFILES[1]
    assert permits(atm, Mti.parse(mti)) is allowed


def test_connection_caps_count_total_and_per_address_and_forget_closed_sources() -> None:
    admission = Admission(max_connections=3, max_per_source=2)
    a, b, c = (address_of(f"10.0.0.{n}") for n in (1, 2, 3))
    assert admission.admit(a, 0.0) is None
    assert admission.admit(a, 0.0) is None
    assert admission.admit(a, 0.0) is Rejection.MAX_CONNECTIONS_PER_IP
    assert admission.admit(b, 0.0) is None
    assert admission.admit(c, 0.0) is Rejection.MAX_CONNECTIONS
    assert admission.connections == 3
    admission.release(a, 0.0)
    assert admission.admit(c, 0.0) is None
    for address in (a, b, c):
        admission.release(address, 0.0)
    assert admission.connections == 0
    assert not admission._sources and not admission._resting  # no buckets were spent


def test_ipv6_limits_count_by_the_64() -> None:
    admission = Admission(max_connections=10, max_per_source=2)
    same_64 = [address_of(f"2001:db8:0:1::{n}") for n in (1, 2, 3)]
    assert [admission.admit(a, 0.0) for a in same_64] == [
        None,
        None,
        Rejection.MAX_CONNECTIONS_PER_IP,
    ]
    assert admission.admit(address_of("2001:db8:0:2::1"), 0.0) is None


def test_the_rate_bucket_is_per_address_and_shared_by_its_connections() -> None:
    limited = profiles({"name": "p", "networks": ["10.0.0.0/8"], "rate": {"tps": 2, "burst": 3}})
    profile = limited[0]
    admission = Admission(10, 10)
    a, b = address_of("10.0.0.1"), address_of("10.0.0.2")
    for address in (a, a, b):
        admission.admit(address, 0.0)
    assert [admission.allow(a, profile, 0.0) for _ in range(4)] == [True, True, True, False]
    assert [admission.allow(b, profile, 0.0) for _ in range(3)] == [True, True, True]
    assert admission.allow(a, profile, 0.5)  # 0.5 s at 2 tps: one token back
    assert not admission.allow(a, profile, 0.5)
    unlimited = profiles({"name": "q", "networks": ["10.0.0.0/8"]}, tls=False)[0]
    assert all(admission.allow(a, unlimited, 0.5) for _ in range(100))


@given(
    tps=st.floats(0.5, 1000),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_the_bucket_never_grants_more_than_burst_plus_rate_times_time(
    tps: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(RateLimit(tps, burst), now=0.0)
    now = 0.0
    granted = 0
    for gap in gaps:
        now += gap
        granted += bucket.take(now)
        assert granted <= burst + tps * now + 1e-6
    # and it grants every request when they come no faster than the rate
    steady = TokenBucket(RateLimit(tps, burst), now=0.0)
    assert all(steady.take(i / tps) for i in range(1, 50))


def test_address_of_strips_a_scope_and_keeps_ipv6() -> None:
    assert address_of("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert address_of("2001:db8::1") == ipaddress.ip_address("2001:db8::1")


def test_reconnecting_buys_no_tokens_until_the_bucket_has_refilled() -> None:
    profile = profiles({"name": "p", "networks": ["10.0.0.0/8"], "rate": {"tps": 1, "burst": 2}})[0]
    admission = Admission(10, 10)
    a = address_of("10.0.0.1")
    admission.admit(a, 0.0)
    assert [admission.allow(a, profile, 0.0) for _ in range(3)] == [True, True, False]
    admission.release(a, 0.0)
    admission.admit(a, 0.5)  # back at once: the same, empty, bucket
    assert not admission.allow(a, profile, 0.5)
    admission.release(a, 0.5)
    admission.admit(a, 5.0)  # back after it refilled: forgotten, and full either way
    assert [admission.allow(a, profile, 5.0) for _ in range(3)] == [True, True, False]
    admission.release(a, 5.0)
    admission.admit(address_of("10.0.0.2"), 10.0)  # resting sources are let go when full
    assert not admission._resting


def test_resting_sources_are_bounded_by_the_connection_cap() -> None:
    profile = profiles({"name": "p", "networks": ["10.0.0.0/8"], "rate": {"tps": 1, "burst": 1}})[0]
    admission = Admission(max_connections=3, max_per_source=1)
    for n in range(10):
        address = address_of(f"10.0.1.{n}")
        admission.admit(address, 0.0)
        admission.allow(address, profile, 0.0)
        admission.release(address, 0.0)
    assert len(admission._resting) == 3


@pytest.mark.parametrize(
    ("mti", "spends"),
    [("0100", True), ("0200", True), ("0800", True), ("0201", False), ("0400", False),
     ("0401", False), ("0420", False), ("0220", False)],
)  # fmt: skip
def test_only_new_requests_spend_tokens(mti: str, spends: bool) -> None:
    assert spends_token(Mti.parse(mti)) is spends
