"""End to end: the gateway as a subprocess in front of real backend processes, real clients."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import openai

from tests.gateway.conftest import base_config
from tests.services import free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


_CLIENT = httpx.Client(timeout=30)  # keep-alive across calls keeps these tests quick


def chat(url: str, key: str | None, model: str = "m", headers: dict | None = None, **body) -> httpx.Response:
    h = {"authorization": f"Bearer {key}"} if key else {}
    return _CLIENT.post(url + "/v1/chat/completions", json={"model": model, **CHAT, **body},
                        headers={**h, **(headers or {})})


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def usage_of(gw, key_id: str | None = None) -> list[dict]:
    params = {"key_id": key_id} if key_id else {}
    return gw.admin("GET", "/admin/usage", params=params).json()["data"]


def test_openai_sdk_non_stream_and_stream_with_usage_counted_once(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]))
    created = gw.admin("POST", "/admin/keys", json={"name": "sdk"}).json()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=created["key"], max_retries=0)

    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello from the fake"
    assert reply.usage.total_tokens == 15

    # No include_usage asked: the gateway injects it upstream and strips the extra chunk.
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake"
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert a.stats()["last_body"]["stream_options"] == {"include_usage": True}

    # include_usage asked: exactly one usage chunk reaches the client.
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].usage.completion_tokens == 5

    def ledger_complete() -> bool:
        rows = usage_of(gw, created["id"])
        return bool(rows) and rows[0]["requests"] == 3

    wait_until(ledger_complete)
    row = usage_of(gw, created["id"])[0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (30, 15)  # each request once, streams too


def distribution(gw, key, model: str, n: int, headers=None, **body) -> Counter:
    return Counter(chat(gw.url, key, model, headers=headers, **body).headers["x-backend-name"] for _ in range(n))


def test_every_strategy_distributes_as_designed(backends, gateway_factory, tmp_path: Path) -> None:
    a, b, c = backends("a"), backends("b"), backends("c")
    urls = [{"url": x.url} for x in (a, b, c)]
    models = [
        {"name": "rr", "strategy": "round_robin", "backends": urls},
        {"name": "w", "strategy": "weighted", "backends": [{"url": a.url, "weight": 3}, {"url": b.url, "weight": 1}]},
        {"name": "lo", "strategy": "least_outstanding", "backends": urls[:2]},
        {"name": "lat", "strategy": "latency", "backends": urls[:2]},
        {"name": "pa", "strategy": "prefix_affinity", "backends": urls, "prefix_chars": 32},
    ]
    gw = gateway_factory(base_config(tmp_path, models))
    key = gw.create_key()
    assert distribution(gw, key, "rr", 30) == {"a": 10, "b": 10, "c": 10}
    assert distribution(gw, key, "w", 40) == {"a": 30, "b": 10}
    # Sequential requests never overlap: least_outstanding ties rotate evenly.
    assert distribution(gw, key, "lo", 20) == {"a": 10, "b": 10}

    # Same session -> same backend; many sessions spread over all three.
    owners = {s: distribution(gw, key, "pa", 3, headers={"x-session-id": f"s{s}"}) for s in range(30)}
    assert all(len(counts) == 1 for counts in owners.values())
    assert len({next(iter(c)) for c in owners.values()}) == 3
    # Without a session id the prompt prefix decides.
    prompt_owner = {chat(gw.url, key, "pa", messages=[{"role": "user", "content": "a shared system prompt longer than 32 chars, then " + str(i)}]
                         ).headers["x-backend-name"] for i in range(5)}
    assert len(prompt_owner) == 1  # first 32 characters are equal

    # latency: a is slow to its first token (its stream head comes at once, as lmserve's does), so
    # after it has been measured b gets (nearly) everything: time to first byte is the first body
    # byte, not the response head.
    a.control(first_chunk_delay=0.15)
    distribution(gw, key, "lat", 6, stream=True)
    assert distribution(gw, key, "lat", 20, stream=True)["b"] >= 18
    a.control(first_chunk_delay=0.0, delay=0.15)

    # least_outstanding under concurrency: slow a keeps requests, so b takes most.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda _: chat(gw.url, key, "lo").headers["x-backend-name"], range(24)))
    assert Counter(names)["b"] > Counter(names)["a"]


def test_retries_go_to_another_backend_and_are_bounded(backends, gateway_factory, tmp_path: Path) -> None:
    a, b, c = backends("a"), backends("b"), backends("c")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": x.url} for x in (a, b, c)]}],
                         retries={"max_attempts": 2, "budget_ratio": 0.2, "min_retries_per_window": 3,
                                  "window_seconds": 600},
                         health={"consecutive_failures": 1000, "error_rate": 1.0, "window_size": 1000})
    gw = gateway_factory(config)
    key = gw.create_key()
    a.control(status=503, fail_count=-1)
    # Round robin starts at a: its 503 is retried on another backend, never reaching the client.
    response = chat(gw.url, key)
    assert response.status_code == 200 and response.headers["x-backend-name"] in ("b", "c")
    assert a.stats()["requests"] == 1

    for x in (b, c):
        x.control(status=503, fail_count=-1)
    before = sum(x.stats()["requests"] for x in (a, b, c))
    statuses = [chat(gw.url, key).status_code for _ in range(20)]
    after = sum(x.stats()["requests"] for x in (a, b, c))
    # Every request fails with the backend's own 503 body, passed through.
    assert statuses == [503] * 20
    # 21 requests so far; budget = max(3, 0.2 * 21) = 4.2 retries in the window, 1 already used.
    assert after - before <= 20 + 4
    assert after - before >= 20 + 3


def test_no_healthy_backend_is_503_at_once_then_fallback_chain(backends, gateway_factory, tmp_path: Path) -> None:
    b = backends("b")
    dead = f"http://127.0.0.1:{free_port()}"
    models = [
        {"name": "alone", "backends": [{"url": dead}]},
        {"name": "primary", "backends": [{"url": dead}], "fallbacks": ["secondary"]},
        {"name": "secondary", "backends": [{"url": b.url}]},
    ]
    gw = gateway_factory(base_config(tmp_path, models, health={"unhealthy_after": 1}))
    key = gw.create_key()
    # Before any probe marks it down, a dead backend is a connect error: fallback serves.
    response = chat(gw.url, key, "primary")
    assert response.status_code == 200 and response.headers["x-backend-name"] == "b"
    assert b.stats()["last_body"]["model"] == "secondary"

    wait_until(lambda: gw.admin("GET", "/admin/health").json()["models"]["alone"]["backends"][0]["healthy"] is False)
    response = chat(gw.url, key, "alone")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_healthy_backend"
    assert response.headers["retry-after"] == "1"
    response = chat(gw.url, key, "primary")
    assert response.status_code == 200 and response.headers["x-backend-name"] == "b"


def test_fallback_when_primary_fails_with_retryable_status(backends, gateway_factory, tmp_path: Path) -> None:
    a, b = backends("a"), backends("b")
    models = [{"name": "primary", "backends": [{"url": a.url}], "fallbacks": ["secondary"]},
              {"name": "secondary", "backends": [{"url": b.url}], "upstream_model": "org/secondary-v2"}]
    gw = gateway_factory(base_config(tmp_path, models))
    key = gw.create_key()
    a.control(status=502, fail_count=-1)
    response = chat(gw.url, key, "primary")
    assert response.status_code == 200 and response.headers["x-backend-name"] == "b"
    assert b.stats()["last_body"]["model"] == "org/secondary-v2"


def _stream(url: str, key: str) -> tuple[str, str | None, str]:
    """Returns (text, error message or None, backend name)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
    text = ""
    with client.chat.completions.with_streaming_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True) as raw:
        name = raw.headers["x-backend-name"]
        try:
            for chunk in raw.parse():
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        except openai.APIError as exc:
            return text, str(exc), name
    return text, None, name


def test_backend_killed_mid_test(backends, gateway_factory, tmp_path: Path) -> None:
    a, b = backends("a"), backends("b")
    for x in (a, b):
        x.control(chunk_delay=0.3, content="abcdefghijklmnop", chunk_chars=2)  # streams take ~2.4 s
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}, {"url": b.url}]}]))
    key = gw.create_key()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        streams = [pool.submit(_stream, gw.url, key) for _ in range(4)]
        wait_until(lambda: a.stats()["in_flight"] >= 2 and b.stats()["in_flight"] >= 2)
        a.kill()
        plain = [pool.submit(lambda: chat(gw.url, key, max_tokens=5)) for _ in range(20)]
        results = [f.result() for f in streams]
        responses = [f.result() for f in plain]
    # Requests that had not started streaming never fail: they go to b.
    assert [r.status_code for r in responses] == [200] * 20
    assert {r.headers["x-backend-name"] for r in responses} == {"b"}
    # Streams already running on a end with a clean error event; those on b complete.
    on_a = [r for r in results if r[2] == "a"]
    on_b = [r for r in results if r[2] == "b"]
    assert len(on_a) == 2 and len(on_b) == 2
    for text, error, _ in on_a:
        assert error is not None and "Upstream failed mid-stream" in error
        assert text and "abcdefghijklmnop".startswith(text)
    for text, error, _ in on_b:
        assert error is None and text == "abcdefghijklmnop"


def test_client_disconnect_cancels_the_upstream_stream(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    a.control(chunk_delay=0.2, content="x" * 100, chunk_chars=1)
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]))
    created = gw.admin("POST", "/admin/keys", json={"name": "leaver"}).json()
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={"model": "m", "stream": True, **CHAT},
                      headers={"authorization": f"Bearer {created['key']}"}, timeout=30) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    wait_until(lambda: a.stats()["streams_cancelled"] == 1)
    assert a.stats()["streams_finished"] == 0
    # The partial stream is still in the ledger (estimated: one token per event sent).
    wait_until(lambda: bool(usage_of(gw, created["id"])))
    row = usage_of(gw, created["id"])[0]
    assert row["requests"] == 1 and 1 <= row["completion_tokens"] < 100


def test_request_id_is_forwarded_and_returned(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]))
    key = gw.create_key()
    response = chat(gw.url, key, headers={"x-request-id": "req-123"})
    assert response.headers["x-request-id"] == "req-123"
    assert a.stats()["last_headers"]["X-Request-ID"] == "req-123"
    # The client's gateway key never travels upstream.
    assert "Authorization" not in a.stats()["last_headers"]
    generated = chat(gw.url, key).headers["x-request-id"]
    assert generated and a.stats()["last_headers"]["X-Request-ID"] == generated
    assert any(entry.get("request_id") == "req-123" and entry.get("status") == 200 for entry in gw.proc.log_entries())


def test_canary_split_between_two_versions(backends, gateway_factory, tmp_path: Path) -> None:
    a, b = backends("a"), backends("b")
    models = [{"name": "v1", "backends": [{"url": a.url}]}, {"name": "v2", "backends": [{"url": b.url}]}]
    gw = gateway_factory(base_config(tmp_path, models, canaries={"chat": {"v1": 80, "v2": 20}}))
    key = gw.create_key()
    counts = distribution(gw, key, "chat", 100)
    assert counts["a"] + counts["b"] == 100
    assert 6 <= counts["b"] <= 36  # 20% of 100 = 20, binomial sd 4


def test_stream_is_passed_through_chunk_by_chunk(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    a.control(chunk_delay=0.3, content="abcdefgh", chunk_chars=1)  # 8 chunks over ~2.4 s
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]))
    key = gw.create_key()
    with _CLIENT.stream("POST", gw.url + "/v1/chat/completions", json={"model": "m", "stream": True, **CHAT},
                        headers={"authorization": f"Bearer {key}"}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # The first event arrived while the backend is still generating the rest.
        assert a.stats()["in_flight"] == 1 and a.stats()["streams_finished"] == 0
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "a"
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and len(rest) == 8


def test_timeouts_first_byte_for_streams_then_total(backends, gateway_factory, tmp_path: Path) -> None:
    slow, fast = backends("slow"), backends("fast")
    slow.control(delay=1.0)
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": slow.url}, {"url": fast.url}]},
                                    {"name": "alone", "backends": [{"url": slow.url}]},
                                    {"name": "stuck", "backends": [{"url": fast.url}]}],
                         timeouts={"connect": 1.0, "first_byte": 0.5, "total": 3.0})
    gw = gateway_factory(config)
    key = gw.create_key()
    # A non-streamed answer comes whole at the end of generation: it waits for the total timeout,
    # not the first-byte one (issue 14, item 10).
    alone = chat(gw.url, key, "alone")
    assert alone.status_code == 200, alone.text
    # A stream whose backend accepted it and stays silent past first_byte gets a 504, and is not
    # retried on the other backend (the first one may still be generating it).
    fast.reset()
    streams = [chat(gw.url, key, stream=True) for _ in range(2)]
    assert sorted(r.status_code for r in streams) == [200, 504], [r.text for r in streams]
    timed_out = next(r for r in streams if r.status_code == 504)
    assert timed_out.json()["error"]["code"] == "upstream_timeout"
    assert fast.stats()["completions"] == 1
    # Head in time, then a body that never ends: the total timeout ends it with a 504.
    fast.control(hang_body=True)
    stuck = chat(gw.url, key, "stuck")
    assert stuck.status_code == 504 and stuck.json()["error"]["code"] == "timeout"
