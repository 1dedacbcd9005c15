"""Power of two choices on the EWMA of time to first byte (weighted by outstanding requests).

Two random candidates are compared on `ewma_ttfb * (1 + outstanding)`, ties broken by outstanding
requests; an unmeasured backend scores 0 so new backends get tried. Two choices rather than the
global minimum keep a fast backend from being flooded by every gateway replica at once.

`ewma_ttfb` is fed by streamed requests only: the seconds from sending a request to the first body
byte, i.e. time to first token (proxy.py). A non-streamed answer's first byte comes only when its
whole generation is done, which measures output length more than backend speed; with no streamed
traffic every backend scores 0 and the choice is by outstanding requests.
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
        if (_score(first), first.num_outstanding) <= (_score(second), second.num_outstanding):
            return first
        return second
