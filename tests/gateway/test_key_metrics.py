"""Per-key and per-tenant metrics (tokens, rejections) and the gateway's added latency, read from a
real gateway's /metrics after real requests with real keys."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import GatewayProc, base_config

_CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
_TOKENS = "lmserve_gateway_key_tokens_total"
_REJECTIONS = "lmserve_gateway_key_rejections_total"


def samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called `name` on the gateway's /metrics, as (labels, value)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return [(s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def total(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(value for got, value in samples(url, name) if all(got.get(k) == v for k, v in labels.items()))


def settled(read: Callable[[], float], expected: float, timeout: float = 10.0) -> float:
    """`read()` once it equals `expected`, or its last value after `timeout`. A streaming client
    returns at `data: [DONE]`, which the gateway relays before it records the stream's usage and
    sends its last byte, so a stream's counters may lag its client by a moment."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def create_key(gw: GatewayProc, **fields: object) -> tuple[str, str]:
    """(secret, key id) of a new key."""
    response = gw.admin("POST", "/admin/keys", json={"name": "test", **fields})
    response.raise_for_status()
    return response.json()["key"], response.json()["id"]


def post(gw: GatewayProc, secret: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body or _CHAT,
                      headers={"authorization": f"Bearer {secret}"}, timeout=30)


def _usage(usage: openai.types.CompletionUsage) -> tuple[int, int, int]:
    details = usage.prompt_tokens_details
    return usage.prompt_tokens, usage.completion_tokens, (details.cached_tokens or 0) if details else 0


def test_per_key_tokens_equal_the_usage_backends_reported(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    a.control(cached_tokens=4)
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]))
    alice, alice_id = create_key(gw, name="alice", tenant="acme")
    bob, bob_id = create_key(gw, name="bob", tenant="acme")
    carol, carol_id = create_key(gw, name="carol")
    reported: dict[str, list[tuple[int, int, int]]] = {alice_id: [], bob_id: [], carol_id: []}
    for secret, key_id, num_requests in ((alice, alice_id, 2), (bob, bob_id, 1), (carol, carol_id, 1)):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
        for _ in range(num_requests):
            answer = client.chat.completions.create(**_CHAT)  # type: ignore[call-overload]
            reported[key_id].append(_usage(answer.usage))
        stream = client.chat.completions.create(**_CHAT, stream=True,  # type: ignore[call-overload]
                                                stream_options={"include_usage": True})
        reported[key_id] += [_usage(chunk.usage) for chunk in stream if chunk.usage is not None]
    # A stream without include_usage: the gateway asks the backend for usage and strips it; the fake
    # reports 10 prompt tokens, one completion token per 4-character chunk of "Hello from the fake".
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=alice, max_retries=0)
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **_CHAT, stream=True) if c.choices) == "Hello from the fake"  # type: ignore[call-overload]
    reported[alice_id].append((10, 5, 4))

    names = {alice_id: ("alice", "acme"), bob_id: ("bob", "acme"), carol_id: ("carol", "-")}
    completions = sum(u[1] for usages in reported.values() for u in usages)
    assert settled(lambda: total(gw.url, _TOKENS, kind="completion"), completions) == completions
    for key_id, usages in reported.items():
        assert len(usages) == (4 if key_id == alice_id else 2)
        name, tenant = names[key_id]
        for index, kind in enumerate(("prompt", "completion", "cached")):
            expected = sum(usage[index] for usage in usages)
            assert expected > 0
            got = [(labels, value) for labels, value in samples(gw.url, _TOKENS)
                   if labels["key"] == key_id and labels["kind"] == kind]
            assert got == [({"key": key_id, "key_name": name, "tenant": tenant, "kind": kind}, expected)]
    acme = sum(u[1] for key_id in (alice_id, bob_id) for u in reported[key_id])
    assert total(gw.url, _TOKENS, tenant="acme", kind="completion") == acme
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    assert not any(secret in text or secret[:10] in text for secret in (alice, bob, carol))  # ids, never secrets


def test_rejections_per_key_equal_the_refusals(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}], "max_in_flight": 1},
                                                {"name": "other", "backends": [{"url": a.url}]}]))
    limited, limited_id = create_key(gw, name="limited", tenant="acme", rpm=2)
    statuses = [post(gw, limited).status_code for _ in range(5)]
    assert statuses.count(200) == 2 and statuses.count(429) == 3
    assert total(gw.url, _REJECTIONS, key=limited_id, reason="requests") == 3
    assert samples(gw.url, _REJECTIONS) == [
        ({"key": limited_id, "key_name": "limited", "tenant": "acme", "reason": "requests"}, 3.0)]
    assert total(gw.url, "lmserve_gateway_rate_limited_total", reason="requests") == 3

    spent, spent_id = create_key(gw, name="spent", budget_tokens=1)
    assert [post(gw, spent).status_code for _ in range(3)] == [200, 429, 429]
    assert total(gw.url, _REJECTIONS, key=spent_id, reason="budget") == 2

    scoped, scoped_id = create_key(gw, name="scoped", models=["other"])
    assert post(gw, scoped).status_code == 403
    assert total(gw.url, _REJECTIONS, key=scoped_id, reason="model_not_allowed") == 1

    expired, expired_id = create_key(gw, name="expired",
                                     expires_at=(dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)).isoformat())
    assert [post(gw, expired).status_code for _ in range(2)] == [401, 401]
    assert total(gw.url, _REJECTIONS, key=expired_id, tenant="-", reason="expired") == 2

    revoked, revoked_id = create_key(gw, name="revoked", tenant="acme")
    assert post(gw, revoked).status_code == 200
    assert gw.admin("DELETE", f"/admin/keys/{revoked_id}").status_code == 200
    assert post(gw, revoked).status_code == 401
    assert total(gw.url, _REJECTIONS, key=revoked_id, reason="revoked") == 1
    assert post(gw, "lms-not-a-key").status_code == 401  # no key known: counted nowhere per key

    # Shedding: one stream holds the model's only slot while another request of the same key arrives.
    a.control(chunk_delay=2.0)
    shed, shed_id = create_key(gw, name="shed", tenant="beta")
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**_CHAT, "stream": True},
                      headers={"authorization": f"Bearer {shed}"}, timeout=30) as held:
        assert held.status_code == 200
        refused = post(gw, shed)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded"
    assert total(gw.url, _REJECTIONS, key=shed_id, tenant="beta", reason="shed") == 1
    assert total(gw.url, _REJECTIONS, tenant="acme") == 3 + 1  # limited's 429s and revoked's 401
    assert total(gw.url, _REJECTIONS) == 3 + 2 + 1 + 2 + 1 + 1


def test_key_and_tenant_labels_are_capped(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}], metrics_max_keys=2))
    keys = [create_key(gw, name=f"k{i}", tenant=tenant) for i, tenant in enumerate(("t1", "t2", "t3", "t1"))]
    for secret, _ in keys:
        assert post(gw, secret).status_code == 200
    completion = {(labels["key"], labels["key_name"], labels["tenant"]): value
                  for labels, value in samples(gw.url, _TOKENS) if labels["kind"] == "completion"}
    # The first two keys and tenants keep their own labels; later ones share `other`, and a later
    # key of a labelled tenant still counts under that tenant.
    assert completion == {(keys[0][1], "k0", "t1"): 5.0, (keys[1][1], "k1", "t2"): 5.0,
                          ("other", "other", "other"): 5.0, ("other", "other", "t1"): 5.0}


def test_added_latency_is_the_time_outside_backends(backends, gateway_factory, tmp_path: Path) -> None:
    a, streaming, failing, spare = backends("a"), backends("s"), backends("f"), backends("spare")
    a.control(delay=0.3)
    streaming.control(chunk_delay=0.1)  # 5 chunks: the stream takes at least 0.5 s upstream
    failing.control(delay=0.3, status=503, fail_count=-1)
    spare.control(delay=0.3)
    gw = gateway_factory(base_config(tmp_path, [
        {"name": "m", "backends": [{"url": a.url}]},
        {"name": "s", "backends": [{"url": streaming.url}]},
        {"name": "r", "backends": [{"url": failing.url}, {"url": spare.url}]},  # round robin: the first try fails
    ]))
    secret, _ = create_key(gw)
    for _ in range(3):
        assert post(gw, secret).status_code == 200
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    for _ in range(2):
        assert len(list(client.chat.completions.create(**{**_CHAT, "model": "s"}, stream=True))) >= 5  # type: ignore[call-overload]
    assert post(gw, secret, {**_CHAT, "model": "r"}).status_code == 200
    assert total(gw.url, "lmserve_gateway_retries_total", model="r") == 1
    limited, _ = create_key(gw, rpm=0)
    assert post(gw, limited).status_code == 429  # refused before any backend: no added-latency sample

    # Each backend wait lasts at least its injected delay, and none of it is added latency.
    upstream_floor = {"m": 3 * 0.3, "s": 2 * 5 * 0.1, "r": 2 * 0.3}
    forwarded = {"m": 3, "s": 2, "r": 1}
    for model, floor in upstream_floor.items():
        added_count = settled(lambda m=model: total(gw.url, "lmserve_gateway_added_latency_seconds_count", model=m),
                              forwarded[model])
        whole_count = total(gw.url, "lmserve_gateway_request_duration_seconds_count", model=model)
        assert added_count == forwarded[model]
        assert whole_count == forwarded[model] + (1 if model == "m" else 0)
        added = total(gw.url, "lmserve_gateway_added_latency_seconds_sum", model=model)
        whole = total(gw.url, "lmserve_gateway_request_duration_seconds_sum", model=model)
        assert 0 < added <= whole - floor, (model, added, whole)
