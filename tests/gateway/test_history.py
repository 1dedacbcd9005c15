"""The traffic history behind the console's charts: rates, error rate and TTFB quantiles per interval."""

from __future__ import annotations

import pytest

from lmserve.gateway.history import TrafficHistory, bucket_quantile
from lmserve.gateway.metrics import GatewayMetrics


def test_bucket_quantile_interpolates_within_a_bucket_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert bucket_quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert bucket_quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(0.15)
    assert bucket_quantile(0.99, bounds, [10, 0, 0, 0]) == pytest.approx(0.099)
    assert bucket_quantile(0.99, bounds, [50, 0, 0, 50]) == 0.4  # past the last bound: that bound


def test_points_are_rates_over_each_interval_and_the_ring_is_bounded() -> None:
    metrics = GatewayMetrics()
    history = TrafficHistory(metrics, interval=2.0, capacity=3)
    history.sample(["m", "idle"], now=100.0)
    assert history.of("m") == []  # a rate needs two readings
    for _ in range(8):
        metrics.requests.add(("m", "http://a", "200"))
        metrics.ttfb.observe(("m", "http://a"), 0.03)
    for _ in range(2):
        metrics.requests.add(("m", "http://b", "503"))
    metrics.ttfb.observe(("m", "http://b"), 3.0)
    metrics.requests.add(("other", "http://c", "200"))
    history.sample(["m", "idle"], now=102.0)
    [point] = history.of("m")
    assert point["requests_per_second"] == 5.0 and point["error_rate"] == 0.2
    assert 25.0 <= point["ttft_p50_ms"] <= 50.0 and point["ttft_p99_ms"] > 2500.0
    assert history.of("idle") == [{"time": 102.0, "requests_per_second": 0.0, "error_rate": None,
                                   "ttft_p50_ms": None, "ttft_p99_ms": None}]
    assert history.of("other") == []  # only the models asked for
    for t in (104.0, 106.0, 108.0):
        history.sample(["m"], now=t)
    points = history.of("m")
    assert [p["time"] for p in points] == [104.0, 106.0, 108.0]
    assert all(p["requests_per_second"] == 0.0 and p["ttft_p50_ms"] is None for p in points)
