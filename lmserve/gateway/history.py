"""A short in-memory history of each model's traffic, for the console's charts (no Prometheus needed).

Every `interval` seconds `sample()` reads the gateway's own counters (requests by model and status,
the upstream time-to-first-byte histogram) and appends, per model, one point: requests per second,
error rate (share of answers with a 5xx status) and TTFB p50/p99 over that interval, estimated from
the histogram buckets the way Prometheus' `histogram_quantile` does (linear within a bucket).

Invariant: each model's deque holds at most `capacity` points, oldest first, one per sample; the
first sample only records the counters (a rate needs two readings).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lmserve.gateway.metrics import GatewayMetrics
from lmserve.gateway.waiter import stop_task

INTERVAL_SECONDS = 2.0
"""How often a point is taken: often enough for "live", cheap (a walk over a few dict entries)."""
CAPACITY = 150
"""Points kept per model: 5 minutes at `INTERVAL_SECONDS`."""


@dataclass(frozen=True, slots=True)
class Point:
    """One model's traffic over one sampling interval ending at `time` (Unix seconds)."""

    time: float
    requests_per_second: float
    error_rate: float | None
    """Share of the interval's answers with a 5xx status; None when there was no answer."""
    ttft_p50_ms: float | None
    """None when no request got a first byte in the interval."""
    ttft_p99_ms: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"time": round(self.time, 3), "requests_per_second": round(self.requests_per_second, 3),
                "error_rate": None if self.error_rate is None else round(self.error_rate, 4),
                "ttft_p50_ms": self.ttft_p50_ms, "ttft_p99_ms": self.ttft_p99_ms}


def bucket_quantile(q: float, bounds: tuple[float, ...], counts: list[float]) -> float | None:
    """The `q` quantile of observations counted per bucket (`counts[i]` for values <= `bounds[i]`, the
    last count for +Inf); None without observations. Past the last finite bound, that bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    below = 0.0
    for i, count in enumerate(counts):
        if count and below + count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / count
        below += count
    return bounds[-1]


class TrafficHistory:
    """Samples `metrics` into per-model rings of `Point`s (see the module docstring)."""

    def __init__(self, metrics: GatewayMetrics, interval: float = INTERVAL_SECONDS,
                 capacity: int = CAPACITY) -> None:
        self.metrics = metrics
        self.interval = interval
        self.capacity = capacity
        self.points: dict[str, deque[Point]] = {}
        self._last: dict[str, tuple[float, float, list[float]]] | None = None
        """Per model at the previous sample: (answers, 5xx answers, TTFB bucket counts)."""
        self._last_time = 0.0
        self._task: asyncio.Task[None] | None = None

    def _read(self) -> dict[str, tuple[float, float, list[float]]]:
        totals: dict[str, tuple[float, float, list[float]]] = {}
        num_buckets = len(self.metrics.ttfb.buckets) + 1
        for (model, _backend, status), count in self.metrics.requests.values.items():
            answers, errors, buckets = totals.get(model, (0.0, 0.0, [0.0] * num_buckets))
            totals[model] = (answers + count, errors + (count if status.startswith("5") else 0.0), buckets)
        for (model, _backend), series in self.metrics.ttfb.series.items():
            answers, errors, buckets = totals.get(model, (0.0, 0.0, [0.0] * num_buckets))
            totals[model] = (answers, errors, [a + b for a, b in zip(buckets, series[1:])])
        return totals

    def sample(self, models: Iterable[str], now: float | None = None) -> None:
        """Appends one point per model in `models` (the gateway's configured ones)."""
        now = time.time() if now is None else now
        current = self._read()
        last, elapsed = self._last, now - self._last_time
        self._last, self._last_time = current, now
        if last is None or elapsed <= 0:
            return
        bounds = self.metrics.ttfb.buckets
        empty = (0.0, 0.0, [0.0] * (len(bounds) + 1))
        for model in models:
            answers, errors, buckets = current.get(model, empty)
            old_answers, old_errors, old_buckets = last.get(model, empty)
            delta = [max(0.0, a - b) for a, b in zip(buckets, old_buckets)]
            num_answers = answers - old_answers
            p50, p99 = bucket_quantile(0.5, bounds, delta), bucket_quantile(0.99, bounds, delta)
            point = Point(now, num_answers / elapsed, (errors - old_errors) / num_answers if num_answers > 0 else None,
                          None if p50 is None else round(p50 * 1000, 1), None if p99 is None else round(p99 * 1000, 1))
            self.points.setdefault(model, deque(maxlen=self.capacity)).append(point)

    def of(self, model: str) -> list[dict[str, float | None]]:
        return [p.as_dict() for p in self.points.get(model, ())]

    def start(self, models: Callable[[], Iterable[str]]) -> None:
        """Samples every `interval` seconds; `models()` names the models to chart."""
        self._task = asyncio.get_running_loop().create_task(self._run(models))

    async def _run(self, models: Callable[[], Iterable[str]]) -> None:
        while True:
            self.sample(models())
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        await stop_task(self._task)
