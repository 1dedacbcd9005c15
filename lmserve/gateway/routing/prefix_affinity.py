"""Consistent hashing with bounded load.

The affinity key (the `X-Session-ID` header, else the prompt's first N characters) is hashed onto a
ring of virtual nodes; the request goes to the first backend clockwise whose in-flight count is
below `ceil(load_factor * (total_in_flight + 1) / num_candidates)`, so a hot key spills over to the
next backend instead of overloading one (Mirrokni et al., "Consistent hashing with bounded loads").
Adding or removing a backend moves only the keys of that backend.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from lmserve.gateway.backends import Backend

_VNODES = 64


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class PrefixAffinityStrategy:
    def __init__(self, load_factor: float = 1.25) -> None:
        self.load_factor = load_factor
        self._ring_urls: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []
        self.counter = 0

    def _ring(self, candidates: Sequence[Backend]) -> None:
        urls = tuple(sorted(b.url for b in candidates))
        if urls == self._ring_urls:
            return
        pairs = sorted((_hash(f"{url}#{i}"), url) for url in urls for i in range(_VNODES))
        self._points = [p for p, _ in pairs]
        self._owners = [u for _, u in pairs]
        self._ring_urls = urls

    def choose(self, candidates: Sequence[Backend], affinity_key: str | None) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        if affinity_key is None:
            self.counter += 1
            return candidates[self.counter % len(candidates)]
        self._ring(candidates)
        by_url = {b.url: b for b in candidates}
        total = sum(b.num_outstanding for b in candidates)
        bound = math.ceil(self.load_factor * (total + 1) / len(candidates))
        start = bisect.bisect(self._points, _hash(affinity_key)) % len(self._points)
        seen: set[str] = set()
        for step in range(len(self._points)):
            url = self._owners[(start + step) % len(self._points)]
            if url in seen:
                continue
            seen.add(url)
            backend = by_url[url]
            if backend.num_outstanding < bound:
                return backend
            if len(seen) == len(by_url):
                break
        return min(candidates, key=lambda b: b.num_outstanding)
