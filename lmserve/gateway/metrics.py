"""Prometheus metrics of one gateway, in its own registry (no process-global state).

The metrics touched by every request (requests, latency, TTFB, tokens, in-flight) are plain dicts
updated from the gateway's one event-loop thread, with no lock and no label lookup, and turned into
metric families only when `/metrics` is scraped. prometheus_client's own counters take a lock and
validate labels on each update: several microseconds per request on the hot path. Rare events
(retries, shedding, limits, breaker state) keep prometheus_client's classes.

Per-key metrics (`lmserve_gateway_key_*`) label a key by its id and name, never its secret, and
bound their label values: see `PrincipalLabels`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lmserve.gateway.auth import Principal

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The gateway's own share of a request is usually well under a millisecond; Redis or a slow client
# can make it seconds.
_ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OTHER = "other"
"""The key (and tenant) label value of every key (tenant) past `metrics_max_keys`."""
NO_TENANT = "-"
"""The tenant label value of a key without a tenant."""
ADDED_LATENCY_HELP = (
    "Seconds a forwarded request spends in the gateway rather than waiting on a backend: from the "
    "request's arrival (headers read) to its last byte sent to the client, minus the time of every "
    "upstream attempt (each from sending the request to the backend's last body byte or failure; "
    "retries' attempts included). Streamed chunks are relayed inside the attempt, so for streams this "
    "is the time before the first attempt, between attempts and after the last upstream byte. One "
    "observation per request that reached a backend; refusals and cache hits have none.")


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
        self.series: dict[tuple[str, ...], list[float]] = {}
        """Per label set: the sum, then the count of each bucket (the last one is +Inf), in one list so
        that an observation costs one dict lookup (and constant, non-negative indices, which the
        interpreter specialises)."""

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] + [0] * (len(self.buckets) + 1)
        series[0] += value
        series[bisect_left(self.buckets, value) + 1] += 1  # bucket bounds are inclusive (value <= le)

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        bounds = [*(repr(float(b)) for b in self.buckets), "+Inf"]
        for key, series in self.series.items():
            cumulative: list[tuple[str, float]] = []
            running: float = 0  # bucket counts are ints: the sum of ints stays an int
            for bound, count in zip(bounds, series[1:]):
                running += count
                cumulative.append((bound, running))
            family.add_metric(key, cumulative, series[0])
        return family


class KeyLabels:
    """The label values of one key in the per-key metrics, and that key's token totals."""

    __slots__ = ("labels", "tokens")

    def __init__(self, key: str, key_name: str, tenant: str) -> None:
        self.labels = (key, key_name, tenant)
        self.tokens: list[int] | None = None
        """This key's `lmserve_gateway_key_tokens` totals (prompt, completion, cached); None until its
        first count (a key with only rejections has no token series)."""


class TokenCounter:
    """A token counter by label set and kind (`kinds`): each label set's totals are one list of ints,
    which callers hold on to (per key, per model), so a request adds to list items instead of
    building and hashing a label tuple per kind. Series become metric families only when scraped.

    Invariant: `series` holds a label set only once something was counted for it.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], kinds: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = (*labels, "kind")
        self.kinds = kinds
        self.series: dict[tuple[str, ...], list[int]] = {}

    def totals(self, labels: tuple[str, ...]) -> list[int]:
        """The totals of `labels` (one per kind), made on the first count."""
        totals = self.series.get(labels)
        if totals is None:
            totals = self.series[labels] = [0] * len(self.kinds)  # ints: int + int is the fast path
        return totals

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, totals in self.series.items():
            for kind, value in zip(self.kinds, totals):
                family.add_metric((*labels, kind), value)
        return family


class PrincipalLabels:
    """Bounded label values for per-key metrics.

    Invariant: at most `max_values` key ids and, separately, at most `max_values` tenants ever get
    their own label value, in the order they are first seen since the gateway started; every later
    key is labelled `key="other", key_name="other"` and every later tenant `tenant="other"`. A key of a
    labelled tenant keeps that tenant even past the key cap, so per-tenant sums stay whole for
    the first `max_values` tenants. Keys have a fixed id, name and tenant, so a key's labels never change.
    """

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self._keys: dict[str, KeyLabels] = {}
        self._tenants: set[str] = set()
        self._past_cap: dict[str, KeyLabels] = {}
        """Tenant label -> the labels of keys past the key cap (at most max_values + 2 entries)."""

    def of(self, principal: Principal) -> KeyLabels:
        labels = self._keys.get(principal.id)
        if labels is not None:
            return labels
        tenant = self._tenant(principal.tenant)
        if len(self._keys) < self.max_values:
            labels = self._keys[principal.id] = KeyLabels(principal.id, principal.name, tenant)
            return labels
        labels = self._past_cap.get(tenant)
        if labels is None:
            labels = self._past_cap[tenant] = KeyLabels(OTHER, OTHER, tenant)
        return labels

    def _tenant(self, tenant: str | None) -> str:
        if tenant is None:
            return NO_TENANT
        if tenant not in self._tenants:
            if len(self._tenants) >= self.max_values:
                return OTHER
            self._tenants.add(tenant)
        return tenant


class _HotCollector(Collector):
    def __init__(self, metrics: list[HotCounter | HotHistogram | TokenCounter]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        for metric in self.metrics:
            yield metric.family()


class GatewayMetrics:
    """Names are prefixed `lmserve_gateway_`; label sets are small and bounded by the config."""

    def __init__(self, max_key_labels: int = 500) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = HotCounter("lmserve_gateway_requests", "Requests answered, by model, backend and status.",
                                   ("model", "backend", "status"))
        self.latency = HotHistogram("lmserve_gateway_request_duration_seconds", "Whole-request latency.", ("model",))
        self.ttfb = HotHistogram("lmserve_gateway_upstream_ttfb_seconds",
                                 "Seconds from sending a request to the backend's first body byte (streams: time "
                                 "to first token; non-streamed answers: the whole generation).", ("model", "backend"))
        self.tokens = TokenCounter("lmserve_gateway_tokens", "Tokens reported by backends.", ("model",),
                                   ("prompt", "completion"))
        self._model_tokens: dict[str, list[int]] = {}
        """Model name -> its `tokens` totals: a str key's hash is cached, a tuple's is not."""
        self.in_flight = HotCounter("lmserve_gateway_in_flight", "Requests in flight.", ("model",), is_gauge=True)
        self.added_latency = HotHistogram("lmserve_gateway_added_latency_seconds", ADDED_LATENCY_HELP, ("model",),
                                          _ADDED_BUCKETS)
        self.key_labels = PrincipalLabels(max_key_labels)
        self.key_tokens = TokenCounter("lmserve_gateway_key_tokens",
                                       "Tokens reported by backends (or estimated for a broken-off stream), by "
                                       "key and tenant; keys and tenants past metrics_max_keys are `other`.",
                                       ("key", "key_name", "tenant"), ("prompt", "completion", "cached"))
        self.key_rejections = HotCounter("lmserve_gateway_key_rejections",
                                         "Requests of a known key refused, by reason: requests, tokens, budget "
                                         "(limits), shed (overload), model_not_allowed, revoked, expired.",
                                         ("key", "key_name", "tenant", "reason"))
        r.register(_HotCollector([self.requests, self.latency, self.ttfb, self.tokens, self.in_flight,
                                  self.added_latency, self.key_tokens, self.key_rejections]))
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
        self.model_loads = Counter("lmserve_gateway_model_loads", "Models loaded on demand (launch).", ["model"],
                                   registry=r)
        self.model_load_seconds = Histogram("lmserve_gateway_model_load_seconds",
                                            "Seconds from starting an on-demand model's server to its readiness.",
                                            ["model"], buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)
        self.model_unloads = Counter("lmserve_gateway_model_unloads",
                                     "On-demand models stopped, by reason: idle, budget (evicted), admin, died.",
                                     ["model", "reason"], registry=r)
        self.model_loaded = Gauge("lmserve_gateway_model_loaded", "1 while an on-demand model is loaded.", ["model"],
                                  registry=r)
        self.ensemble_members = Counter("lmserve_gateway_ensemble_members",
                                        "Ensemble members by outcome: won, answered (and lost), failed, cancelled.",
                                        ["ensemble", "model", "outcome"], registry=r)
        self.tls_cert_expiry = Gauge("lmserve_gateway_tls_cert_expiry_timestamp_seconds",
                                     "Unix time the served TLS certificate expires (only when terminating TLS).",
                                     ["certfile"], registry=r)

    def record_tokens(self, model: str, principal: Principal, prompt: int, completion: int, cached: int) -> None:
        """Counts a request's tokens by model and by key (once per request: no label tuple is built)."""
        totals = self._model_tokens.get(model)
        if totals is None:
            totals = self._model_tokens[model] = self.tokens.totals((model,))
        totals[0] += prompt
        totals[1] += completion
        labels = self.key_labels.of(principal)
        totals = labels.tokens
        if totals is None:
            totals = labels.tokens = self.key_tokens.totals(labels.labels)
        totals[0] += prompt
        totals[1] += completion
        totals[2] += cached

    def record_key_rejection(self, principal: Principal, reason: str) -> None:
        self.key_rejections.add((*self.key_labels.of(principal).labels, reason))

    def set_tls_certificate(self, certfile: str) -> None:
        """Read once: the server's TLS context is built at start, so the certificate it serves is the
        one on disk then, even if the file is rotated later (a restart picks the new one up)."""
        from cryptography import x509

        with open(certfile, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.tls_cert_expiry.labels(certfile).set(cert.not_valid_after_utc.timestamp())

    def render(self) -> bytes:
        return generate_latest(self.registry)
