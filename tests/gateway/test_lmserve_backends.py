"""The gateway in front of two real `lmserve serve` processes on a tiny random model."""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import base_config
from tests.services import Process, free_port, python_module, start_process

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def lmserve_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Process]]:
    from tests.tiny_models import build_model

    model = tmp_path_factory.mktemp("gateway-model")
    build_model("llama3", model)

    def start(name: str) -> Process:
        port = free_port()
        args = python_module("lmserve.cli", "serve", str(model), "--port", str(port), "--served-model-name", "tiny",
                             "--num-blocks", "256")
        return start_process(args, port, tmp_path_factory.mktemp(name) / "server.log", ready_path="/ready",
                             timeout=120)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(start, ["serve-a", "serve-b"]))
    yield servers
    for server in servers:
        server.stop()


def backend_counts(gateway_url: str) -> dict[str, float]:
    text = httpx.get(gateway_url + "/metrics").text
    counts: dict[str, float] = {}
    for backend, value in re.findall(r'lmserve_gateway_requests_total\{backend="([^"]+)",model="tiny",'
                                     r'status="200"\} ([\d.]+)', text):
        counts[backend] = float(value)
    return counts


def test_sdk_through_gateway_with_usage_counted_once(lmserve_backends, gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(base_config(tmp_path, [{"name": "tiny",
                                                 "backends": [{"url": s.url} for s in lmserve_backends]}]))
    created = gw.admin("POST", "/admin/keys", json={"name": "real", "tpm": 100000}).json()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=created["key"], max_retries=0, timeout=60)
    expected = [0, 0, 0]
    for _ in range(4):
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
        expected[0] += 1
        expected[1] += reply.usage.prompt_tokens
        expected[2] += reply.usage.completion_tokens
    assert backend_counts(gw.url) == {lmserve_backends[0].url: 2.0, lmserve_backends[1].url: 2.0}

    plain = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, stream=True))
    assert plain and all(c.usage is None for c in plain)  # the injected usage chunk was stripped
    with_usage = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, stream=True,
                                                     stream_options={"include_usage": True}))
    usage_chunks = [c.usage for c in with_usage if c.usage is not None]
    assert len(usage_chunks) == 1
    expected[0] += 2
    expected[1] += 2 * usage_chunks[0].prompt_tokens  # same prompt, same model: same counts
    expected[2] += 2 * usage_chunks[0].completion_tokens

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = gw.admin("GET", "/admin/usage", params={"key_id": created["id"]}).json()["data"]
        if rows and rows[0]["requests"] == expected[0]:
            break
        time.sleep(0.1)
    assert [rows[0]["requests"], rows[0]["prompt_tokens"], rows[0]["completion_tokens"]] == expected
    health = gw.admin("GET", "/admin/health").json()["models"]["tiny"]["backends"]
    assert all(b["healthy"] and b["ready"] for b in health)


def per_model_counts(gateway_url: str, model: str) -> dict[str, float]:
    text = httpx.get(gateway_url + "/metrics").text
    pattern = rf'lmserve_gateway_requests_total\{{backend="([^"]+)",model="{model}",status="200"\}} ([\d.]+)'
    return {backend: float(value) for backend, value in re.findall(pattern, text)}


def test_strategies_over_real_servers(lmserve_backends, gateway_factory, tmp_path: Path) -> None:
    a, b = (s.url for s in lmserve_backends)
    models = [{"name": "rr", "upstream_model": "tiny", "backends": [{"url": a}, {"url": b}]},
              {"name": "w", "upstream_model": "tiny", "strategy": "weighted",
               "backends": [{"url": a, "weight": 3}, {"url": b, "weight": 1}]},
              {"name": "pa", "upstream_model": "tiny", "strategy": "prefix_affinity",
               "backends": [{"url": a}, {"url": b}]}]
    gw = gateway_factory(base_config(tmp_path, models))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.create_key(), max_retries=0, timeout=60)
    for model, n in (("rr", 6), ("w", 8)):
        for _ in range(n):
            client.completions.create(model=model, prompt="The quick", max_tokens=1)
    assert per_model_counts(gw.url, "rr") == {a: 3.0, b: 3.0}
    assert per_model_counts(gw.url, "w") == {a: 6.0, b: 2.0}
    for _ in range(5):  # one session always lands on the same server
        client.completions.create(model="pa", prompt="The quick", max_tokens=1,
                                  extra_headers={"x-session-id": "conversation-42"})
    assert sorted(per_model_counts(gw.url, "pa").values()) == [5.0]


def test_one_real_backend_killed_no_request_fails(lmserve_backends, gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(base_config(tmp_path, [{"name": "tiny",
                                                 "backends": [{"url": s.url} for s in lmserve_backends]}]))
    key = gw.create_key()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60)
    lmserve_backends[1].kill()
    # Connect errors to the dead server are retried on the live one (and soon its breaker opens).
    replies = [client.completions.create(model="tiny", prompt="Paged attention", max_tokens=3, temperature=0)
               for _ in range(6)]
    assert all(r.choices and 1 <= r.usage.completion_tokens <= 3 for r in replies)
    assert backend_counts(gw.url) == {lmserve_backends[0].url: 6.0}
