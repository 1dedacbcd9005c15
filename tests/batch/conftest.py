"""Fixtures for the Batch API: real `lmserve serve demo` backends behind real gateways (tests/gateway/conftest.py)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.gateway.conftest import gateway_factory, postgres_url  # noqa: F401 -- fixtures this package uses
from tests.services import Process, free_port, python_module, start_process

BACKEND_KEY = "backend-secret"
"""The servers' own key: with it they honour the gateway's priority and tenant headers."""
BATCH_SETTINGS = {"poll_interval": 0.1, "lease_seconds": 1.0, "retry_interval": 0.1, "concurrency": 2}


@pytest.fixture(scope="module")
def demo_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Process]]:
    def start(name: str) -> Process:
        port = free_port()
        args = python_module("lmserve.cli", "serve", "demo", "--port", str(port), "--served-model-name", "demo",
                             "--api-key", BACKEND_KEY, "--scheduling-policy", "priority")
        return start_process(args, port, tmp_path_factory.mktemp(name) / "server.log", ready_path="/ready",
                             timeout=180)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(start, ["demo-a", "demo-b"]))
    yield servers
    for server in servers:
        server.stop()


def chat_lines(count: int, max_tokens: int = 8, **extra: Any) -> bytes:
    """A batch input file of `count` greedy chat requests with custom ids req-0, req-1, ..."""
    return b"".join(orjson.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "demo", "messages": [{"role": "user", "content": f"Tell me about number {i}."}],
                 "max_tokens": max_tokens, "temperature": 0, **extra}}) + b"\n" for i in range(count))


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls `check` until it returns something truthy; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def gateway_config(tmp_path: Path, urls: list[str], **batch: Any) -> dict[str, Any]:
    from tests.gateway.conftest import base_config

    return base_config(tmp_path, [{"name": "demo", "backends": [{"url": u, "api_key": BACKEND_KEY} for u in urls]}],
                       batch={**BATCH_SETTINGS, **batch})
