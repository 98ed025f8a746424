"""Round-trip times: a peak-sensitive moving average for balancing and recent samples."""

from __future__ import annotations

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
