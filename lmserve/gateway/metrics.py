"""Prometheus metrics of one gateway, in its own registry (no process-global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """Names are prefixed `lmserve_gateway_`; label sets are small and bounded by the config."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lmserve_gateway_requests", "Requests answered, by model, backend and status.",
                                ["model", "backend", "status"], registry=r)
        self.latency = Histogram("lmserve_gateway_request_duration_seconds", "Whole-request latency.",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("lmserve_gateway_upstream_ttfb_seconds", "Time to the backend's first byte.",
                              ["model", "backend"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("lmserve_gateway_tokens", "Tokens reported by backends.",
                              ["model", "kind"], registry=r)
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
        self.in_flight = Gauge("lmserve_gateway_in_flight", "Requests in flight.", ["model"], registry=r)
        self.shared_state_errors = Counter("lmserve_gateway_shared_state_errors",
                                           "Failed calls to shared state (Redis); the gateway failed open.",
                                           ["component"], registry=r)
        self.cache = Counter("lmserve_gateway_cache", "Response cache lookups.", ["result"], registry=r)

        self._children: dict[tuple[object, ...], object] = {}

    def child(self, metric: object, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: the hot path skips prometheus_client's lock and checks."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)  # type: ignore[attr-defined]
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
