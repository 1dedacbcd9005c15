"""Retry accounting (issue 14, item 12): the budget and fallback counters count, and a backend that
closes the connection without replying is retried only within the retry budget."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import base_config
from tests.gateway.recording_backend import recording_backend

_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# One retry per window whatever the traffic: the second failing request finds the budget spent.
_TIGHT_BUDGET = {"max_attempts": 3, "budget_ratio": 0.0, "min_retries_per_window": 1, "window_seconds": 600}


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of the gateway's /metrics (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _post(gw, key: str, model: str = "m") -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(gw.url + "/v1/chat/completions", json={**_BODY, "model": model},
                      headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_budget_exhaustion_and_fallbacks_are_counted(backends, gateway_factory, tmp_path: Path) -> None:
    a, b, spare = backends("a"), backends("b"), backends("spare")
    a.control(status=503, fail_count=-1)
    b.control(status=503, fail_count=-1)
    gw = gateway_factory(base_config(tmp_path, [
        {"name": "m", "backends": [{"url": a.url}, {"url": b.url}]},
        {"name": "primary", "backends": [{"url": a.url}], "fallbacks": ["backup"]},
        {"name": "backup", "backends": [{"url": spare.url}]},
    ], retries=_TIGHT_BUDGET))
    key = gw.create_key()
    served = _post(gw, key, "primary")  # a answers 503; moving to the fallback spends the one retry
    assert served.status_code == 200 and served.headers["x-backend-name"] == "spare"
    assert metric(gw.url, "lmserve_gateway_fallbacks_total", model="primary", fallback="backup") == 1
    assert metric(gw.url, "lmserve_gateway_retry_budget_exhausted_total") == 0
    refused = _post(gw, key)  # a or b answers 503, and no retry is left
    assert refused.status_code == 503
    assert metric(gw.url, "lmserve_gateway_retry_budget_exhausted_total") == 1


def test_backend_closing_without_reply_is_retried_within_the_budget(gateway_factory, tmp_path: Path) -> None:
    with recording_backend() as a, recording_backend() as b:
        a.is_closing_unanswered = b.is_closing_unanswered = True
        gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}, {"url": b.url}]}],
                                         retries=_TIGHT_BUDGET))
        key = gw.create_key()
        first = _post(gw, key)
        assert first.status_code == 502 and first.json()["error"]["code"] == "upstream_error"
        assert len(a.completions()) + len(b.completions()) == 2  # the first try and its one retry
        second = _post(gw, key)
        assert second.status_code == 502 and second.json()["error"]["code"] == "retry_budget_exhausted"
        # The backend may have read the request before it closed: no attempt beyond the budget.
        assert len(a.completions()) + len(b.completions()) == 3
        assert metric(gw.url, "lmserve_gateway_retry_budget_exhausted_total") == 1
