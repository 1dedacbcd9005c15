"""Least outstanding requests; ties go round robin so idle backends share the load evenly."""

from __future__ import annotations

from collections.abc import Sequence

from lmserve.gateway.backends import Backend


class LeastOutstandingStrategy:
    def __init__(self) -> None:
        self.counter = 0

    def choose(self, candidates: Sequence[Backend], affinity_key: str | None) -> Backend:
        self.counter += 1
        n = len(candidates)
        best = candidates[self.counter % n]
        for i in range(1, n):
            backend = candidates[(self.counter + i) % n]
            if backend.num_outstanding < best.num_outstanding:
                best = backend
        return best
