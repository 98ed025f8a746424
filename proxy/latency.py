"""Round-trip times: a peak-sensitive moving average for balancing and recent samples."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


class PeakEwma:
    """Moving average of round-trip times that jumps up to a slow sample at once and decays
    towards faster samples with time constant `decay` seconds (Finagle's peak EWMA).

    Reacting to a slowdown at once and to a recovery gradually keeps traffic away from a
    switch that has just become slow.
    """

    def __init__(self, decay: float = 10.0) -> None:
        self._decay = decay
        self._value: float | None = None
        self._stamp = 0.0

    @property
    def value(self) -> float | None:
        return self._value

    def observe(self, rtt: float, now: float) -> None:
        if self._value is None or rtt >= self._value:
            self._value = rtt
        else:
            weight = math.exp(-max(0.0, now - self._stamp) / self._decay)
            self._value = self._value * weight + rtt * (1.0 - weight)
        self._stamp = now


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (`fraction` in 0..1) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


# Upper bounds (seconds) for latency histograms: payment round trips, 1 ms to 30 s.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Histogram:
    """Counts of observations per latency bucket, and their sum (exported at scrape time)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def merge(self, other: Histogram) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.total += other.total

    def cumulative(self) -> list[tuple[str, float]]:
        """(upper bound, observations at or below it), ending with +Inf: Prometheus's form."""
        running = 0
        out = []
        for bound, count in zip((*LATENCY_BUCKETS, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(bound), float(running)))
        return out
