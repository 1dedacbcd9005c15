"""Prometheus metrics of one gateway, in its own registry (no process-global state).

The metrics touched by every request (requests, latency, TTFB, tokens, in-flight) are plain dicts
updated from the gateway's one event-loop thread, with no lock and no label lookup, and turned into
metric families only when `/metrics` is scraped. prometheus_client's own counters take a lock and
validate labels on each update: several microseconds per request on the hot path. Rare events
(retries, shedding, limits, breaker state) keep prometheus_client's classes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class HotCounter:
    """A labelled counter (or, with `is_gauge`, a gauge) keyed by a tuple of label values."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], is_gauge: bool = False) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.is_gauge = is_gauge
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def family(self) -> CounterMetricFamily | GaugeMetricFamily:
        family_class = GaugeMetricFamily if self.is_gauge else CounterMetricFamily
        family = family_class(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family


class HotHistogram:
    """A labelled histogram: per label set, one count per bucket (the last one is +Inf) and a sum."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...],
                 buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.buckets = buckets
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = [0] * (len(self.buckets) + 1)
            self.sums[key] = 0.0
        counts[bisect_left(self.buckets, value)] += 1  # bucket bounds are inclusive (value <= le)
        self.sums[key] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        bounds = [*(repr(float(b)) for b in self.buckets), "+Inf"]
        for key, counts in self.counts.items():
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts):
                running += count
                cumulative.append((bound, running))
            family.add_metric(key, cumulative, self.sums[key])
        return family


class _HotCollector(Collector):
    def __init__(self, metrics: list[HotCounter | HotHistogram]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        for metric in self.metrics:
            yield metric.family()


class GatewayMetrics:
    """Names are prefixed `lmserve_gateway_`; label sets are small and bounded by the config."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = HotCounter("lmserve_gateway_requests", "Requests answered, by model, backend and status.",
                                   ("model", "backend", "status"))
        self.latency = HotHistogram("lmserve_gateway_request_duration_seconds", "Whole-request latency.", ("model",))
        self.ttfb = HotHistogram("lmserve_gateway_upstream_ttfb_seconds",
                                 "Seconds from sending a request to the backend's first body byte (streams: time "
                                 "to first token; non-streamed answers: the whole generation).", ("model", "backend"))
        self.tokens = HotCounter("lmserve_gateway_tokens", "Tokens reported by backends.", ("model", "kind"))
        self.in_flight = HotCounter("lmserve_gateway_in_flight", "Requests in flight.", ("model",), is_gauge=True)
        r.register(_HotCollector([self.requests, self.latency, self.ttfb, self.tokens, self.in_flight]))
        self.retries = Counter("lmserve_gateway_retries", "Requests retried on another backend.",
                               ["model"], registry=r)
        self.retry_budget_exhausted = Counter("lmserve_gateway_retry_budget_exhausted",
                                              "Retries skipped because the retry budget was spent.", registry=r)
        self.fallbacks = Counter("lmserve_gateway_fallbacks", "Requests served by a fallback model.",
                                 ["model", "fallback"], registry=r)
        self.breaker_state = Gauge("lmserve_gateway_breaker_state", "0 closed, 1 open, 2 half-open.",
                                   ["model", "backend"], registry=r)
        self.backend_healthy = Gauge("lmserve_gateway_backend_healthy", "1 when probes succeed.",
                                     ["model", "backend"], registry=r)
        self.rate_limited = Counter("lmserve_gateway_rate_limited", "Requests refused by limits.",
                                    ["reason"], registry=r)
        self.shed = Counter("lmserve_gateway_shed", "Requests shed by priority under load.",
                            ["model", "priority"], registry=r)
        self.shared_state_errors = Counter("lmserve_gateway_shared_state_errors",
                                           "Failed calls to shared state (Redis); the gateway failed open.",
                                           ["component"], registry=r)
        self.cache = Counter("lmserve_gateway_cache", "Response cache lookups.", ["result"], registry=r)
        self.tls_cert_expiry = Gauge("lmserve_gateway_tls_cert_expiry_timestamp_seconds",
                                     "Unix time the served TLS certificate expires (only when terminating TLS).",
                                     ["certfile"], registry=r)

    def set_tls_certificate(self, certfile: str) -> None:
        """Read once: the server's TLS context is built at start, so the certificate it serves is the
        one on disk then, even if the file is rotated later (a restart picks the new one up)."""
        from cryptography import x509

        with open(certfile, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.tls_cert_expiry.labels(certfile).set(cert.not_valid_after_utc.timestamp())

    def render(self) -> bytes:
        return generate_latest(self.registry)
