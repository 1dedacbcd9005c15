"""Tenant and priority come from a trusted gateway only; request ids are unique whatever the client sends."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import SERVED_MODEL_NAME as MODEL
from tests.services import Process

SERVER_KEY = "server-key-for-the-gateway"
CLIENT_IDENTITY = {"priority": -1000, "tenant": "victim", "user": "end-user-7"}
CLIENT_HEADERS = {"x-tenant": "victim-header", "x-priority": "-1000"}


@pytest.fixture(scope="module")
def servers(start_server) -> Iterator[dict[str, Process]]:
    flags = {"keyed": ("--api-key", SERVER_KEY), "trusting": ("--trust-client-identity",)}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = dict(zip(flags, pool.map(lambda f: start_server(*f), flags.values())))
    yield started


def complete(server: Process, request_id: str, body: dict | None = None, headers: dict | None = None,
             key: str | None = None) -> httpx.Response:
    sent = {"x-request-id": request_id, **(headers or {})}
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    return httpx.post(server.url + "/v1/completions", headers=sent, timeout=60,
                      json={"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 2, **(body or {})})


def logged(server: Process, request_id: str) -> dict:
    lines = [e for e in server.log_entries("request") if e.get("request_id") == request_id]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_server_without_a_trusted_gateway_ignores_what_clients_say_about_themselves(server) -> None:
    response = complete(server, "self-declared", CLIENT_IDENTITY,
                        {**CLIENT_HEADERS, "x-lmserve-tenant": "forged", "x-lmserve-priority": "high"})
    assert response.status_code == 200, response.text
    entry = logged(server, "self-declared")
    assert (entry["tenant"], entry.get("priority")) == ("", 0)


def test_the_gateway_headers_are_honoured_with_the_servers_key_and_client_fields_are_not(servers) -> None:
    keyed = servers["keyed"]
    response = complete(keyed, "from-gateway", CLIENT_IDENTITY,
                        {**CLIENT_HEADERS, "x-lmserve-tenant": "team%20%C3%A9", "x-lmserve-priority": "low"},
                        key=SERVER_KEY)
    assert response.status_code == 200, response.text
    entry = logged(keyed, "from-gateway")
    assert (entry["tenant"], entry["priority"]) == ("team é", 1)
    # The `user` of OpenAI's API names an end user; it never becomes the tenant.
    complete(keyed, "only-user", {"user": "end-user-7"}, key=SERVER_KEY).raise_for_status()
    assert logged(keyed, "only-user")["tenant"] == ""
    # Without the server's key nothing reaches the engine at all.
    assert complete(keyed, "no-key", headers={"x-lmserve-priority": "high"}).status_code == 401


def test_a_bad_priority_header_is_an_openai_400(servers) -> None:
    response = complete(servers["keyed"], "bad-priority", headers={"x-lmserve-priority": "urgent"}, key=SERVER_KEY)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "priority" and "high, normal, low" in error["message"]


def test_trust_client_identity_honours_the_body_and_headers_but_never_user(servers) -> None:
    trusting = servers["trusting"]
    complete(trusting, "body", CLIENT_IDENTITY).raise_for_status()
    assert (logged(trusting, "body")["tenant"], logged(trusting, "body")["priority"]) == ("victim", -1000)
    complete(trusting, "headers", {"user": "end-user-7"}, {"x-tenant": "acme", "x-priority": "high"}
             ).raise_for_status()
    assert (logged(trusting, "headers")["tenant"], logged(trusting, "headers")["priority"]) == ("acme", -1)
    complete(trusting, "user-only", {"user": "end-user-7"}).raise_for_status()
    assert logged(trusting, "user-only")["tenant"] == ""


def running(server: Process) -> int:
    return httpx.get(server.url + "/v1/status", timeout=10).json()["running"]


def test_two_concurrent_requests_with_one_client_request_id_both_succeed(server) -> None:
    """The client's X-Request-ID is a correlation id: the engine's ids are the server's own."""
    long_stream = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 1000, "ignore_eos": True,
                   "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=long_stream, timeout=60,
                      headers={"x-request-id": "same-id"}) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert running(server) == 1  # the first request is in the engine now
        second = complete(server, "same-id")
        assert second.status_code == 200, second.text
        assert second.headers["x-request-id"] == "same-id"
    ids = {second.json()["id"], complete(server, "same-id").json()["id"]}
    assert len(ids) == 2 and not any("same-id" in i for i in ids)
    deadline = time.monotonic() + 30  # the aborted stream's line is written once the server sees the close
    while len(statuses := [e["status"] for e in server.log_entries("request") if e.get("request_id") == "same-id"]) < 3:
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)
    assert sorted(statuses) == [200, 200, 499]
