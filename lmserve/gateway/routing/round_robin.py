"""Round robin: each backend in turn. Invariant: `counter` only grows."""

from __future__ import annotations

from collections.abc import Sequence

from lmserve.gateway.backends import Backend


class RoundRobinStrategy:
    def __init__(self) -> None:
        self.counter = 0

    def choose(self, candidates: Sequence[Backend], affinity_key: str | None) -> Backend:
        backend = candidates[self.counter % len(candidates)]
        self.counter += 1
        return backend
