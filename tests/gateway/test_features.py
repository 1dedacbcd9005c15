"""Cache, redaction, validation, health and breakers, admin backends, metrics: end to end."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import base_config

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
_CLIENT = httpx.Client(timeout=30)


def post(url: str, key: str | None, body: dict | None = None, raw: bytes | None = None,
         headers: dict | None = None, path: str = "/v1/chat/completions") -> httpx.Response:
    h = {"authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return _CLIENT.post(url + path, content=raw, headers={**h, "content-type": "application/json",
                                                               **(headers or {})})
    return _CLIENT.post(url + path, json=body if body is not None else {"model": "m", **CHAT},
                        headers={**h, **(headers or {})})


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_cache_hits_and_serves_stale_when_backends_fail(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}],
                         cache={"enabled": True, "ttl": 1.0, "stale_ttl": 60.0})
    gw = gateway_factory(config)
    key = gw.create_key()
    body = {"model": "m", **CHAT, "temperature": 0}
    first = post(gw.url, key, body)
    assert first.status_code == 200 and "x-lmserve-cache" not in first.headers
    second = post(gw.url, key, {**body, "messages": CHAT["messages"]})  # same request, other key order
    assert second.headers["x-lmserve-cache"] == "hit" and second.json() == first.json()
    assert a.stats()["requests"] == 1
    post(gw.url, key, {**body, "temperature": 0.7})  # not deterministic: never cached
    post(gw.url, key, {**body, "temperature": 0.7})
    assert a.stats()["requests"] == 3
    seeded = {**body, "temperature": 0.7, "seed": 7}
    post(gw.url, key, seeded)
    assert post(gw.url, key, seeded).headers["x-lmserve-cache"] == "hit"

    time.sleep(1.1)  # past the TTL: the next request goes to the backend, which now fails
    a.control(status=503, fail_count=-1)
    stale = post(gw.url, key, body)
    assert stale.status_code == 200 and stale.headers["x-lmserve-cache"] == "stale"
    assert stale.json() == first.json()
    uncached = post(gw.url, key, {**body, "max_tokens": 3})
    assert uncached.status_code == 503
    metrics = _CLIENT.get(gw.url + "/metrics").text
    assert 'lmserve_gateway_cache_total{result="hit"} 2.0' in metrics
    assert 'lmserve_gateway_cache_total{result="stale"} 1.0' in metrics


def test_redaction_in_whole_responses_and_across_stream_chunks(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    text = "Contact alice.smith@example.com, key sk-ABCDEFGHIJKLMNOPQRSTUV0123, bye."
    a.control(content=text, chunk_chars=3)  # every secret is split over several chunks
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}], redaction={
        "patterns": [r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", r"sk-[A-Za-z0-9]{20,}"],
        "max_match_chars": 64})
    gw = gateway_factory(config)
    key = gw.create_key()
    expected = "Contact [REDACTED], key [REDACTED], bye."
    assert post(gw.url, key).json()["choices"][0]["message"]["content"] == expected
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    for options in (None, {"include_usage": True}):
        extra = {"stream_options": options} if options else {}
        chunks = list(client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True, **extra))
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(deltas) == expected
        assert not any("@" in d or "sk-" in d for d in deltas)
        assert sum(1 for c in chunks if c.usage is not None) == (1 if options else 0)
    completion = client.completions.create(model="m", prompt="x", stream=True)
    assert "".join(c.choices[0].text for c in completion if c.choices) == expected


BAD_INPUTS = [
    (b"", 400), (b"not json", 400), (b"[1, 2]", 400), (b'{"messages": []}', 400),
    (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400),
    (b'{"model": "m"}', 400), (b'{"model": "m", "messages": "hi"}', 400),
    (b'{"model": "m", "messages": [{"content": "x"}]}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": 1}', 400),
    (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404),
    (b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 3000 + b'"}]}', 400),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "pad": "' + b"x" * 9000 + b'"}', 413),
    (b'\xff\xfe{"model"', 400),
]


def test_every_bad_input_gets_an_openai_error_body(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}],
                         limits={"max_body_bytes": 8192, "max_prompt_chars": 2000, "max_tokens_limit": 4096})
    gw = gateway_factory(config)
    key = gw.create_key()
    for raw, status in BAD_INPUTS:
        response = post(gw.url, key, raw=raw)
        assert response.status_code == status, raw[:60]
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], raw[:60]
    completions = [b'{"model": "m"}', b'{"model": "m", "prompt": 5}', b'{"model": "m", "prompt": []}']
    for raw in completions:
        response = post(gw.url, key, raw=raw, path="/v1/completions")
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    for method, path in (("GET", "/v1/chat/completions"), ("GET", "/nope"), ("DELETE", "/v1/models")):
        response = _CLIENT.request(method, gw.url + path, headers={"authorization": f"Bearer {key}"})
        assert response.status_code in (404, 405) and "error" in response.json()
    assert a.stats()["requests"] == 0  # nothing bad reached the backend
    assert "Traceback" not in gw.proc.log()


def test_breaker_opens_and_recovers(backends, gateway_factory, tmp_path: Path) -> None:
    a, b = backends("a"), backends("b")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}, {"url": b.url}]}],
                         health={"consecutive_failures": 3, "cooldown": 3.0, "probe_interval": 30},
                         retries={"retry_on_status": []})
    gw = gateway_factory(config)
    key = gw.create_key()
    a.control(status=500, fail_count=-1)
    for _ in range(6):  # round robin: a gets 3 of these, all 500s -> breaker opens
        post(gw.url, key)
    state = gw.admin("GET", "/admin/health").json()["models"]["m"]["backends"]
    assert state[0]["breaker"] == "open" and state[1]["breaker"] == "closed"
    before = a.stats()["requests"]
    assert {post(gw.url, key).headers["x-backend-name"] for _ in range(6)} == {"b"}
    assert a.stats()["requests"] == before  # no traffic while open
    assert 'lmserve_gateway_breaker_state{backend="' + a.url + '",model="m"} 1.0' in _CLIENT.get(
        gw.url + "/metrics").text

    a.control(status=None, fail_count=0)  # a recovers
    # Cooldown: the next request to a is the half-open trial. Until then (3 s from the breaker
    # opening, long enough for the ~11 round trips above on a loaded machine) a gets nothing.
    time.sleep(3.1)
    names = [post(gw.url, key).headers["x-backend-name"] for _ in range(6)]
    assert "a" in names
    assert gw.admin("GET", "/admin/health").json()["models"]["m"]["backends"][0]["breaker"] == "closed"


def _breaker(gw, index: int) -> str:  # type: ignore[no-untyped-def]
    return gw.admin("GET", "/admin/health").json()["models"]["m"]["backends"][index]["breaker"]


def test_a_trial_stream_closes_the_breaker_once_the_backend_answers(backends, gateway_factory,
                                                                    tmp_path: Path) -> None:
    """A backend that came back takes traffic again while its (long) trial stream still runs."""
    a, b = backends("a"), backends("b")
    config = base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}, {"url": b.url}]}],
                         health={"consecutive_failures": 3, "cooldown": 1.0, "probe_interval": 30},
                         retries={"retry_on_status": []})
    gw = gateway_factory(config)
    key = gw.create_key()
    headers = {"authorization": f"Bearer {key}"}
    a.control(status=500, fail_count=-1)
    for _ in range(6):
        post(gw.url, key)
    assert _breaker(gw, 0) == "open"
    a.control(status=None, fail_count=0, chunk_delay=0.5, content="0123456789", chunk_chars=1)  # 5 s streams
    body = {"model": "m", "stream": True, **CHAT}
    with httpx.Client(timeout=30) as client:
        trial = None
        deadline = time.monotonic() + 20
        while trial is None and time.monotonic() < deadline:  # after the cooldown, a gets the trial
            response = client.send(client.build_request("POST", gw.url + "/v1/chat/completions", json=body,
                                                        headers=headers), stream=True)
            if response.headers["x-backend-name"] == "a":
                trial = response
            else:
                response.read()
                response.close()
        assert trial is not None, "a never got its trial request"
        try:
            assert a.stats()["in_flight"] == 1
            assert _breaker(gw, 0) == "closed"  # the 200 head was enough
            # a takes new requests while its trial still streams (round robin: one of two).
            names = [post(gw.url, key).headers["x-backend-name"] for _ in range(2)]
            assert "a" in names and a.stats()["in_flight"] >= 1
        finally:
            assert trial.read().endswith(b"data: [DONE]\n\n")
            trial.close()
    assert _breaker(gw, 0) == "closed"


def test_unhealthy_and_unready_backends_get_no_traffic(backends, gateway_factory, tmp_path: Path) -> None:
    a, b = backends("a"), backends("b")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}, {"url": b.url}]}],
                                     health={"unhealthy_after": 1}))
    key = gw.create_key()

    def backend_state(i: int) -> dict:
        return gw.admin("GET", "/admin/health").json()["models"]["m"]["backends"][i]

    a.control(ready=503)
    wait_until(lambda: backend_state(0)["ready"] is False)
    assert {post(gw.url, key).headers["x-backend-name"] for _ in range(4)} == {"b"}
    a.control(ready=404)  # a server without /ready is ready when /health is fine
    wait_until(lambda: backend_state(0)["ready"] is True)
    b.control(health=500)
    wait_until(lambda: backend_state(1)["healthy"] is False)
    assert {post(gw.url, key).headers["x-backend-name"] for _ in range(4)} == {"a"}
    a.control(health=500)
    wait_until(lambda: backend_state(0)["healthy"] is False)
    assert _CLIENT.get(gw.url + "/ready").status_code == 503
    assert _CLIENT.get(gw.url + "/health").status_code == 200
    b.control(health=200)
    wait_until(lambda: _CLIENT.get(gw.url + "/ready").status_code == 200)


def test_admin_adds_drains_and_removes_backends_at_run_time(backends, gateway_factory, tmp_path: Path) -> None:
    a, b = backends("a"), backends("b")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]))
    key = gw.create_key()
    assert gw.admin("POST", "/admin/backends", json={"model": "m", "url": b.url}).status_code == 201
    assert gw.admin("POST", "/admin/backends", json={"model": "m", "url": b.url}).status_code == 400
    assert {post(gw.url, key).headers["x-backend-name"] for _ in range(4)} == {"a", "b"}

    a.control(chunk_delay=0.2, content="abcdefgh", chunk_chars=1)
    with _CLIENT.stream("POST", gw.url + "/v1/chat/completions", json={"model": "m", "stream": True, **CHAT},
                        headers={"authorization": f"Bearer {key}"}) as stream:
        assert stream.headers["x-backend-name"] == "a"
        assert gw.admin("POST", "/admin/backends/drain", json={"model": "m", "url": a.url}).json()["draining"]
        assert {post(gw.url, key).headers["x-backend-name"] for _ in range(4)} == {"b"}
        body = "".join(stream.iter_text())
    assert body.count("data: ") >= 9 and body.rstrip().endswith("data: [DONE]")  # the drained stream finished

    # The drain-and-roll runbook's last step: the replaced server takes traffic again (issue 14, item 12).
    undrained = gw.admin("POST", "/admin/backends/undrain", json={"model": "m", "url": a.url})
    assert undrained.status_code == 200 and undrained.json()["draining"] is False
    assert {post(gw.url, key).headers["x-backend-name"] for _ in range(4)} == {"a", "b"}
    assert gw.admin("POST", "/admin/backends/undrain", json={"model": "m", "url": "http://127.0.0.1:1"}).status_code == 404

    removed = gw.admin("POST", "/admin/backends/remove", json={"model": "m", "url": a.url}).json()
    assert removed["removed"] is True
    listed = gw.admin("GET", "/admin/backends").json()["models"]["m"]["backends"]
    assert [x["url"] for x in listed] == [b.url]
    assert gw.admin("POST", "/admin/backends/drain", json={"model": "m", "url": a.url}).status_code == 404
    assert gw.admin("POST", "/admin/backends", json={"model": "zzz", "url": a.url}).status_code == 404


def test_metrics_and_json_logs(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}]))
    key = gw.create_key(rpm=1)
    post(gw.url, key)
    post(gw.url, key)  # 429
    text = _CLIENT.get(gw.url + "/metrics").text
    assert f'lmserve_gateway_requests_total{{backend="{a.url}",model="m",status="200"}} 1.0' in text
    assert 'lmserve_gateway_requests_total{backend="-",model="m",status="429"} 1.0' in text
    assert 'lmserve_gateway_rate_limited_total{reason="requests"} 1.0' in text
    assert 'lmserve_gateway_tokens_total{kind="completion",model="m"} 5.0' in text
    assert "lmserve_gateway_upstream_ttfb_seconds_bucket" in text
    assert 'lmserve_gateway_in_flight{model="m"} 0.0' in text
    requests = gw.proc.log_entries("request")
    assert [e["status"] for e in requests] == [200, 429]
    assert all(e["request_id"] and e["level"] == "info" for e in requests)


@pytest.mark.parametrize("path", ["/v1/completions"])
def test_text_completions_pass_through(backends, gateway_factory, tmp_path: Path, path: str) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}], "aliases": ["mm"]}]))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.create_key(), max_retries=0)
    assert client.completions.create(model="mm", prompt="Hello").choices[0].text == "Hello from the fake"
    assert a.stats()["last_body"]["model"] == "m"  # alias resolved to the model's name upstream
    assert [m.id for m in client.models.list()] == ["m", "mm"]
