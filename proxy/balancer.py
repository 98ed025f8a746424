"""Balancing strategies: in which order the healthy candidates are offered a request.

Each returns every candidate, best first, so the caller can fail over down the list.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
H = TypeVar("H", bound=Hashable)


class RoundRobin(Generic[T]):
    """Each call starts one step further along, so load spreads evenly."""

    def __init__(self) -> None:
        self._turn = 0

    def order(self, candidates: Sequence[T]) -> list[T]:
        if not candidates:
            return []
        start = self._turn % len(candidates)
        self._turn += 1
        return [*candidates[start:], *candidates[:start]]


class SmoothWeighted(Generic[H]):
    """Smooth weighted round-robin (as in nginx): over any window, each candidate is first
    in proportion to its weight, and picks are interleaved rather than bunched."""

    def __init__(self) -> None:
        self._current: dict[H, int] = {}

    def order(self, candidates: Sequence[H], weights: Sequence[int]) -> list[H]:
        if not candidates:
            return []
        for candidate, weight in zip(candidates, weights, strict=True):
            self._current[candidate] = self._current.get(candidate, 0) + weight
        best = max(candidates, key=self._current.__getitem__)
        self._current[best] -= sum(weights)
        rest = sorted(
            (c for c in candidates if c != best), key=self._current.__getitem__, reverse=True
        )
        return [best, *rest]


class LeastCost(Generic[T]):
    """Cheapest first; equal costs take turns."""

    def __init__(self) -> None:
        self._ties: RoundRobin[tuple[T, float]] = RoundRobin()

    def order(self, candidates: Sequence[T], costs: Sequence[float]) -> list[T]:
        rotated = self._ties.order(list(zip(candidates, costs, strict=True)))
        return [candidate for candidate, _ in sorted(rotated, key=lambda pair: pair[1])]
