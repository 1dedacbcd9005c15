"""Fixtures: fake backends, gateways as real subprocesses, real Redis and PostgreSQL.

`backends` starts OpenAI-compatible backends; today they are the fault-injecting fake (fake_backend.py).
A fixture starting `lmserve serve` on a tiny model can replace it for the tests that are not about
faults: those tests only use `.url`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.services import Process, free_port, python_module, start_postgres, start_process, start_redis

ADMIN_KEY = "test-admin-key"


class FakeBackendProc:
    """A running fake backend: `.url`, `.control(**faults)`, `.stats()`, `.kill()`."""

    def __init__(self, name: str, proc: Process) -> None:
        self.name = name
        self.proc = proc
        self.url = proc.url

    def control(self, **state: Any) -> None:
        httpx.post(self.url + "/_control", json=state, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/_stats", timeout=5).json()

    def reset(self) -> None:
        httpx.post(self.url + "/_reset", timeout=5).raise_for_status()

    def kill(self) -> None:
        self.proc.kill()


class GatewayProc:
    """A running gateway subprocess with helpers for its admin API."""

    def __init__(self, proc: Process, config: dict[str, Any], config_path: Path) -> None:
        self.proc = proc
        self.url = proc.url
        self.config = config
        self.config_path = config_path

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                             **{"timeout": 10, **kwargs})

    def create_key(self, **fields: Any) -> str:
        response = self.admin("POST", "/admin/keys", json={"name": "test", **fields})
        response.raise_for_status()
        return response.json()["key"]


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Callable[[str], FakeBackendProc]]:
    started: list[FakeBackendProc] = []

    def start(name: str) -> FakeBackendProc:
        port = free_port()
        proc = start_process(python_module("tests.gateway.fake_backend", "--port", str(port), "--name", name),
                             port, tmp_path / f"backend-{name}.log")
        backend = FakeBackendProc(name, proc)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.proc.kill()


def base_config(tmp_path: Path, models: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "models": models,
        "database_url": f"sqlite:///{tmp_path / 'gateway.db'}",
        "admin_key": ADMIN_KEY,
        "health": {"probe_interval": 0.2, "probe_timeout": 1.0, "cooldown": 1.0},
        "timeouts": {"connect": 1.0, "first_byte": 5.0, "total": 30.0},
        "ledger_flush_interval": 0.1,
        "key_cache_ttl": 1.0,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProc]]:
    started: list[GatewayProc] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None, name: str = "gw",
              scheme: str = "http") -> GatewayProc:
        port = free_port()
        config = {**config, "port": port}
        path = tmp_path / f"{name}-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = start_process(python_module("lmserve.cli", "gateway", "--config", str(path)), port,
                             tmp_path / f"{name}-{port}.log", env=env, scheme=scheme)
        gateway = GatewayProc(proc, config, path)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.proc.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{proc.port}/0"
    proc.kill()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    # Not under pytest's tmp dir: that is private to root and the server runs as `postgres`.
    tmp = Path(tempfile.mkdtemp(prefix="lmserve-pg-"))
    tmp.chmod(0o755)
    proc, url = start_postgres(tmp)
    yield url
    proc.stop()
    shutil.rmtree(tmp, ignore_errors=True)
