"""Power of two choices on the EWMA of time to first byte (weighted by outstanding requests).

Two random candidates are compared on `ewma_ttfb * (1 + outstanding)`; an unmeasured backend scores
0 so new backends get tried. Two choices rather than the global minimum keep a fast backend from
being flooded by every gateway replica at once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lmserve.gateway.backends import Backend


def _score(backend: Backend) -> float:
    if backend.ewma_ttfb is None:
        return 0.0
    return backend.ewma_ttfb * (1 + backend.num_outstanding)


class LatencyStrategy:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Backend], affinity_key: str | None) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        return first if _score(first) <= _score(second) else second
