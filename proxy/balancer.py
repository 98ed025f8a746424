"""Balancing strategies: which healthy candidate gets the next request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class RoundRobin(Generic[T]):
    """Each call starts one step further along, so load spreads evenly over the candidates.

    `order` returns every candidate, starting with the chosen one, so the caller can fail
    over to the next in line when the first cannot take the request.
    """

    def __init__(self) -> None:
        self._turn = 0

    def order(self, candidates: Sequence[T]) -> list[T]:
        if not candidates:
            return []
        start = self._turn % len(candidates)
        self._turn += 1
        return [*candidates[start:], *candidates[:start]]
