"""Smooth weighted round robin (as nginx does): deterministic, each backend gets its weight's share
and picks are spread out rather than bunched. Invariant: `current` weights sum to 0 after a pick
over an unchanged candidate set."""

from __future__ import annotations

from collections.abc import Sequence

from lmserve.gateway.backends import Backend


class WeightedStrategy:
    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def choose(self, candidates: Sequence[Backend], affinity_key: str | None) -> Backend:
        total = 0.0
        best = candidates[0]
        best_value = float("-inf")
        for backend in candidates:
            value = self.current.get(backend.url, 0.0) + backend.weight
            self.current[backend.url] = value
            total += backend.weight
            if value > best_value:
                best, best_value = backend, value
        self.current[best.url] = best_value - total
        return best
