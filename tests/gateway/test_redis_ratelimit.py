"""RPM / TPM / budgets exact across two gateway replicas sharing a real Redis; load shedding."""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from pathlib import Path

import httpx

from tests.gateway.conftest import base_config
from tests.services import start_redis

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def post(url: str, key: str, stream: bool = False, headers: dict | None = None) -> httpx.Response:
    body = {"model": "m", **CHAT, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key}", **(headers or {})}, timeout=30)


def two_replicas(backends, gateway_factory, tmp_path: Path, redis_url: str):
    a = backends("a")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}], redis_url=redis_url)
    return gateway_factory(config, name="r1"), gateway_factory(config, name="r2")


def test_rpm_is_exact_across_two_replicas(backends, gateway_factory, tmp_path: Path, redis_url: str) -> None:
    g1, g2 = two_replicas(backends, gateway_factory, tmp_path, redis_url)
    key = g1.create_key(rpm=10)
    urls = [g1.url, g2.url] * 15
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda u: post(u, key), urls))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "10"
    # Both replicas admitted some: the limit really is shared, not per replica.
    served_by = {r.url.port for r in responses if r.status_code == 200}
    assert len(served_by) == 2


def test_tpm_counts_streamed_usage_once_across_replicas(backends, gateway_factory, tmp_path: Path,
                                                        redis_url: str) -> None:
    g1, g2 = two_replicas(backends, gateway_factory, tmp_path, redis_url)
    key = g1.create_key(tpm=40)  # each request costs 15 tokens (10 prompt + 5 completion)
    statuses = [post(url, key, stream=True).status_code for url in itertools.islice(itertools.cycle(
        [g1.url, g2.url]), 6)]
    # Admitted while the window's tokens are below 40: at 0, 15 and 30 -> 3 requests (45 tokens).
    assert statuses == [200, 200, 200, 429, 429, 429]
    refused = post(g2.url, key)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_token_budget_is_shared_and_persistent(backends, gateway_factory, tmp_path: Path, redis_url: str) -> None:
    g1, g2 = two_replicas(backends, gateway_factory, tmp_path, redis_url)
    key = g1.create_key(budget_tokens=50)
    statuses = [post(url, key).status_code for url in [g1.url, g2.url] * 3]
    assert statuses == [200, 200, 200, 200, 429, 429]  # 0, 15, 30, 45 < 50; then 60
    refused = post(g1.url, key)
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert "retry-after" not in refused.headers
    # A replica started later sees the same spent budget.
    g3 = gateway_factory(g1.config, name="r3")
    assert post(g3.url, key).status_code == 429


def test_budget_is_seeded_from_the_ledger_without_redis(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}])
    gw = gateway_factory(config, name="first")
    key = gw.create_key(budget_tokens=40)
    assert [post(gw.url, key).status_code for _ in range(4)] == [200, 200, 200, 429]
    gw.proc.stop()  # SIGTERM flushes the ledger
    restarted = gateway_factory(config, name="second")
    assert post(restarted.url, key).status_code == 429


def test_lower_priority_is_shed_first(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    a.control(delay=4.0)  # the slow requests must still be in flight when the last one is refused
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}], "max_in_flight": 4}],
                         shedding={"high": 1.0, "normal": 0.75, "low": 0.5})
    gw = gateway_factory(config)
    key = gw.create_key()
    high_key = gw.create_key(priority="high")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        slow = [pool.submit(post, gw.url, key, False, {"x-priority": "low"}) for _ in range(2)]
        deadline = time.monotonic() + 10
        while a.stats()["requests"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        low = post(gw.url, key, headers={"x-priority": "low"})  # 2 in flight >= 4 * 0.5
        normal = pool.submit(post, gw.url, key)  # 2 < 3: admitted
        while a.stats()["requests"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        normal_refused = post(gw.url, key)  # 3 >= 3
        high = pool.submit(post, gw.url, high_key)  # 3 < 4
        results = [f.result().status_code for f in [*slow, normal, high]]
    assert low.status_code == 429 and low.json()["error"]["code"] == "overloaded"
    assert low.headers["retry-after"] == "1"
    assert normal_refused.status_code == 429
    assert results == [200, 200, 200, 200]
    # The header may lower a request's priority but never raise it above its key's.
    a.control(delay=0)
    assert post(gw.url, key, headers={"x-priority": "high"}).status_code == 200


def test_response_cache_is_shared_through_redis(backends, gateway_factory, tmp_path: Path, redis_url: str) -> None:
    a = backends("a")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}], redis_url=redis_url,
                         cache={"enabled": True, "ttl": 60})
    g1, g2 = gateway_factory(config, name="c1"), gateway_factory(config, name="c2")
    key = g1.create_key(tenant="shared-cache-test")
    body = {"model": "m", "messages": [{"role": "user", "content": f"cache {time.time()}"}], "temperature": 0}
    first = httpx.post(g1.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    second = httpx.post(g2.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    assert first.status_code == second.status_code == 200
    assert second.headers["x-lmserve-cache"] == "hit" and second.json() == first.json()
    assert a.stats()["requests"] == 1
    # Another tenant never sees this tenant's cached answer.
    other = g1.create_key(tenant="someone-else")
    third = httpx.post(g2.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {other}"})
    assert "x-lmserve-cache" not in third.headers and a.stats()["requests"] == 2


def redis_gateway(backends, gateway_factory, tmp_path: Path, **limits: float):
    a = backends("a")
    redis = start_redis(tmp_path)
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}],
                         redis_url=f"redis://127.0.0.1:{redis.port}/0", limits=limits)
    return redis, gateway_factory(config)


def test_redis_outage_falls_back_to_local_counts(backends, gateway_factory, tmp_path: Path) -> None:
    redis, gw = redis_gateway(backends, gateway_factory, tmp_path)
    key = gw.create_key(rpm=2)
    assert [post(gw.url, key).status_code for _ in range(3)] == [200, 200, 429]
    redis.kill()
    # The window's two admissions were counted in this process too: no third one while Redis is away.
    refused = [post(gw.url, key) for _ in range(3)]
    assert [r.status_code for r in refused] == [429, 429, 429]
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused[0].headers["retry-after"]) <= 60
    # A key this replica has not seen yet is limited locally too; asking Redis for it failed (counted).
    other = gw.create_key(rpm=1)
    assert [post(gw.url, other).status_code for _ in range(2)] == [200, 429]
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'lmserve_gateway_shared_state_errors_total{component="rate limiter"}' in metrics


def test_rpm_holds_across_a_redis_restart(backends, gateway_factory, tmp_path: Path) -> None:
    redis, gw = redis_gateway(backends, gateway_factory, tmp_path)
    key = gw.create_key(rpm=4)
    assert [post(gw.url, key).status_code for _ in range(5)] == [200, 200, 200, 200, 429]
    redis.kill()
    restarted = start_redis(tmp_path, port=redis.port)  # same address, empty: the counters are gone
    try:
        statuses = [post(gw.url, key).status_code for _ in range(4)]
    finally:
        restarted.kill()
    # Still the same 60 s window: 4 admitted before the restart is all the key may have.
    assert statuses == [429, 429, 429, 429]


def test_local_window_ends_on_time_during_an_outage(backends, gateway_factory, tmp_path: Path) -> None:
    redis, gw = redis_gateway(backends, gateway_factory, tmp_path, window_seconds=5.0)
    key = gw.create_key(rpm=1)
    opened = time.monotonic()  # the window opens at the first request, not before this
    assert [post(gw.url, key).status_code for _ in range(2)] == [200, 429]
    redis.kill()
    time.sleep(max(0.0, opened + 5.5 - time.monotonic()))  # past the window Redis opened
    # Local counts are never stricter than the shared limit: a new (local) window admits again.
    assert [post(gw.url, key).status_code for _ in range(2)] == [200, 429]
