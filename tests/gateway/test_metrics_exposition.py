"""The gateway's hot-path metric classes expose what prometheus_client's own classes would.

HotHistogram and TokenCounter keep their numbers in plain lists (to keep the per-request cost low,
benchmarks/gateway_instructions.py); these tests pin their /metrics text: cumulative buckets with
inclusive bounds, sums, counts, and token totals per model and per key.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmserve.gateway.auth import Principal
from lmserve.gateway.metrics import _LATENCY_BUCKETS, GatewayMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: bytes, prefix: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples if s.name.startswith(prefix) and not s.name.endswith("_created")}


def test_latency_histogram_matches_prometheus_client() -> None:
    # Bucket bounds themselves (0.001, 0.0025, 120), zero, between bounds and past the last bound.
    observations = [0.0, 0.001, 0.0025, 0.003, 0.7, 0.7, 120.0, 500.0]
    metrics = GatewayMetrics()
    reference_registry = CollectorRegistry()
    reference = Histogram("lmserve_gateway_request_duration_seconds", "Whole-request latency.", ["model"],
                          buckets=_LATENCY_BUCKETS, registry=reference_registry)
    for value in observations:
        metrics.latency.observe(("m",), value)
        reference.labels("m").observe(value)
    metrics.latency.observe(("other",), 0.02)
    reference.labels("other").observe(0.02)

    name = "lmserve_gateway_request_duration_seconds"
    got = _samples(metrics.render(), name)
    assert got == _samples(generate_latest(reference_registry), name)
    assert got[(name + "_count", (("model", "m"),))] == len(observations)
    assert got[(name + "_bucket", (("le", "0.0025"), ("model", "m")))] == 3  # inclusive bound


def test_token_counters_by_model_and_key() -> None:
    metrics = GatewayMetrics(max_key_labels=2)
    alpha = Principal("k1", "alpha", "acme", None, None, None, None)
    beta = Principal("k2", "beta", None, None, None, None, None)
    gamma = Principal("k3", "gamma", "acme", None, None, None, None)  # past the key cap: `other`
    refused = Principal("k4", "delta", None, None, None, None, None)
    metrics.record_tokens("m1", alpha, 3, 5, 1)
    metrics.record_tokens("m1", alpha, 2, 0, 0)
    metrics.record_tokens("m2", beta, 1, 1, 0)
    metrics.record_tokens("m2", gamma, 10, 20, 4)
    metrics.record_key_rejection(refused, "shed")

    got = _samples(metrics.render(), "lmserve_gateway_")
    model = "lmserve_gateway_tokens_total"
    assert {labels: v for (n, labels), v in got.items() if n == model} == {
        (("kind", "prompt"), ("model", "m1")): 5, (("kind", "completion"), ("model", "m1")): 5,
        (("kind", "prompt"), ("model", "m2")): 11, (("kind", "completion"), ("model", "m2")): 21}
    key = "lmserve_gateway_key_tokens_total"
    by_key = {labels: v for (n, labels), v in got.items() if n == key}

    def series(key_id: str, name: str, tenant: str, kind: str) -> tuple[tuple[str, str], ...]:
        return (("key", key_id), ("key_name", name), ("kind", kind), ("tenant", tenant))

    assert by_key == {
        series("k1", "alpha", "acme", "prompt"): 5, series("k1", "alpha", "acme", "completion"): 5,
        series("k1", "alpha", "acme", "cached"): 1,
        series("k2", "beta", "-", "prompt"): 1, series("k2", "beta", "-", "completion"): 1,
        series("k2", "beta", "-", "cached"): 0,
        series("other", "other", "acme", "prompt"): 10, series("other", "other", "acme", "completion"): 20,
        series("other", "other", "acme", "cached"): 4,
    }  # the refused key (only a rejection) has no token series
