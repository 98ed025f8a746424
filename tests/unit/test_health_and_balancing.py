"""Pure health and balancing: the link state machine, strategies, latency, STANs."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.balancer import LeastCost, SmoothWeighted
from proxy.config import HealthConfig
from proxy.health import Echo, LinkHealth, LinkState, Verdict
from proxy.latency import Histogram, PeakEwma
from proxy.network import ECHO, StanSequence, network_request

HEALTH = HealthConfig(
    echo_interval=10, echo_timeout=3, rise_interval=1, fall=3, rise=2, timeout_threshold=5
)


def _run(health: LinkHealth, events: str) -> list[Verdict]:
    """e = approved echo, x = unanswered echo, d = declined echo, a = answered transaction,
    t = transaction timeout."""
    steps = {
        "e": lambda: health.echo(Echo.APPROVED),
        "x": lambda: health.echo(Echo.UNANSWERED),
        "d": lambda: health.echo(Echo.DECLINED),
        "a": lambda: health.transaction(answered=True),
        "t": lambda: health.transaction(answered=False),
    }
    return [steps[event]() for event in events]


K, U, D = Verdict.KEEP, Verdict.UP, Verdict.DROP


@pytest.mark.parametrize(
    ("events", "verdicts", "state"),
    [
        ("e", [K], LinkState.CONNECTING),
        ("ee", [K, U], LinkState.UP),
        ("exe", [K, K, K], LinkState.CONNECTING),  # rise needs good echoes in a row
        ("exee", [K, K, K, U], LinkState.UP),
        ("xxx", [K, K, D], LinkState.CONNECTING),  # fall applies on probation too
        ("eexx", [K, U, K, K], LinkState.UP),
        ("eexxx", [K, U, K, K, D], LinkState.UP),
        ("eexxexx", [K, U, K, K, K, K, K], LinkState.UP),  # fall needs failures in a row
        ("eexdx", [K, U, K, K, D], LinkState.UP),  # declined counts as failed
        ("dde", [K, K, K], LinkState.CONNECTING),
        ("ttttt", [K] * 5, LinkState.CONNECTING),  # timeouts count only once up
        ("eetttt", [K, U, K, K, K, K], LinkState.UP),
        ("eettttt", [K, U, K, K, K, K, D], LinkState.UP),
        ("eettttattttt", [K, U, K, K, K, K, K, K, K, K, K, D], LinkState.UP),
    ],
)
def test_link_health(events: str, verdicts: list[Verdict], state: LinkState) -> None:
    health = LinkHealth(HEALTH)
    assert _run(health, events) == verdicts
    assert health.state is state


def test_echo_cadence_is_faster_on_probation() -> None:
    health = LinkHealth(HEALTH)
    assert health.next_echo_in() == 1
    _run(health, "ee")
    assert health.next_echo_in() == 10
    _run(health, "x")
    assert health.next_echo_in() == 0  # unanswered: confirmed (or cleared) at once
    _run(health, "d")
    assert health.next_echo_in() == 1  # declined: not in a burst
    _run(health, "e")
    assert health.next_echo_in() == 10


@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=5))
def test_smooth_weighted_follows_the_weights_exactly_over_a_cycle(weights: list[int]) -> None:
    names = [f"s{i}" for i in range(len(weights))]
    turns: SmoothWeighted[str] = SmoothWeighted()
    firsts = Counter(turns.order(names, weights)[0] for _ in range(sum(weights) * 3))
    assert firsts == Counter({n: w * 3 for n, w in zip(names, weights, strict=True)})


def test_smooth_weighted_interleaves_and_offers_everyone() -> None:
    turns: SmoothWeighted[str] = SmoothWeighted()
    orders = [turns.order(["a", "b", "c"], [5, 1, 1]) for _ in range(7)]
    assert [o[0] for o in orders] == ["a", "a", "b", "a", "c", "a", "a"]
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)


def test_smooth_weighted_when_a_switch_leaves_and_comes_back() -> None:
    turns: SmoothWeighted[str] = SmoothWeighted()
    before = [turns.order(["a", "b"], [3, 1])[0] for _ in range(4)]
    alone = [turns.order(["a"], [3])[0] for _ in range(3)]
    after = Counter(turns.order(["a", "b"], [3, 1])[0] for _ in range(40))
    assert sorted(before) == ["a", "a", "a", "b"]
    assert alone == ["a", "a", "a"]
    assert after == Counter({"a": 30, "b": 10})  # no catch-up burst, no starvation


def test_least_cost_prefers_the_cheapest_and_rotates_ties() -> None:
    least: LeastCost[str] = LeastCost()
    assert least.order(["a", "b", "c"], [3.0, 1.0, 2.0]) == ["b", "c", "a"]
    firsts = [least.order(["a", "b"], [1.0, 1.0])[0] for _ in range(4)]
    assert sorted(firsts) == ["a", "a", "b", "b"]


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    ewma = PeakEwma(decay=10.0)
    assert ewma.value is None
    ewma.observe(0.010, now=0.0)
    ewma.observe(0.100, now=1.0)
    assert ewma.value == 0.100  # a slow sample counts at once
    ewma.observe(0.010, now=2.0)
    assert ewma.value is not None and 0.090 < ewma.value < 0.100  # a fast one only slowly
    for second in range(3, 120):
        ewma.observe(0.010, now=float(second))
    assert ewma.value == pytest.approx(0.010, abs=1e-4)


def test_stan_sequence_wraps_and_stays_six_digits() -> None:
    stans = StanSequence(start=999_998)
    assert [next(stans) for _ in range(4)] == ["999998", "999999", "000001", "000002"]
    assert next(StanSequence(start=0)) == "999999"


def test_network_request() -> None:
    message = network_request(ECHO, "000123", datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC))
    assert message.mti.code == "0800"
    assert dict(message.fields) == {"7": "1231235958", "11": "000123", "70": "301"}


def test_latency_histogram_buckets_are_cumulative_and_merge() -> None:
    first, second = Histogram(), Histogram()
    for seconds in (0.0005, 0.001, 0.003, 0.2):
        first.observe(seconds)
    second.observe(45.0)  # above every bound
    first.merge(second)
    buckets = dict(first.cumulative())
    assert (buckets["0.001"], buckets["0.005"], buckets["0.25"], buckets["30.0"]) == (2, 3, 4, 4)
    assert buckets["+Inf"] == 5
    assert first.total == pytest.approx(45.2045)
