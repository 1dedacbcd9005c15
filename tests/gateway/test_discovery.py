"""DNS discovery: a `discovery: dns` backend becomes one backend per address, re-resolved."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from lmserve.gateway.config import BackendConfig, GatewayConfig, HealthConfig, ModelConfig, config_from_dict
from lmserve.gateway.discovery import BackendDiscovery, SystemResolver, address_url
from lmserve.gateway.router import Router
from tests.gateway.conftest import ADMIN_KEY, base_config
from tests.gateway.dns_gateway import HostsFileResolver
from tests.services import Process, free_port, is_port_free, python_module, start_process

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")  # all loopback on Linux (127/8)


@pytest.mark.parametrize("backend, message", [
    ({"url": "http://pool:8000", "discovery": "srv"}, "discovery must be one of"),
    ({"url": "http://pool:8000", "discovery": "dns", "resolve_interval": 0}, "resolve_interval must be > 0"),
    ({"url": "http://10.0.0.5:8000", "discovery": "dns"}, "needs a host name"),
    ({"url": "http://[::1]:8000", "discovery": "dns"}, "needs a host name"),
    ({"url": "https://pool:8000", "discovery": "dns"}, "needs an http:// URL"),
])
def test_bad_discovery_settings_are_refused(backend: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict({"models": [{"name": "m", "backends": [backend]}]})


def test_address_url_keeps_scheme_port_and_path() -> None:
    assert address_url("http://pool.ns.svc:8000/base", "10.1.2.3") == "http://10.1.2.3:8000/base"
    assert address_url("http://pool", "fd00::7") == "http://[fd00::7]:80"


class ScriptedResolver:
    """Answers what the test last set: a list of addresses, or an OSError to raise."""

    def __init__(self) -> None:
        self.answer: list[str] | OSError = []

    async def resolve(self, host: str, port: int) -> list[str]:
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)


def _discovery() -> tuple[BackendDiscovery, ScriptedResolver, Router]:
    template = BackendConfig("http://pool.test:9000", weight=2.0, api_key="k", discovery="dns")
    config = GatewayConfig(models=[ModelConfig("m", [template, BackendConfig("http://127.0.0.1:9999")])])
    router = Router(config)
    resolver = ScriptedResolver()
    return BackendDiscovery(router, HealthConfig(), resolver), resolver, router


def test_pool_follows_the_addresses_and_drains_vanished_ones() -> None:
    discovery, resolver, router = _discovery()
    pool = router.pools["m"]
    target = discovery.targets[0]
    assert [b.url for b in pool.backends] == ["http://127.0.0.1:9999"]  # the template is not a backend

    resolver.answer = ["10.0.0.1", "10.0.0.2"]
    asyncio.run(discovery.refresh(target))
    first = {b.url: b for b in pool.backends if b.discovered_from}
    assert sorted(first) == ["http://10.0.0.1:9000", "http://10.0.0.2:9000"]
    assert all(b.weight == 2.0 and b.auth_header == b"Bearer k" for b in first.values())

    resolver.answer = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    first["http://10.0.0.1:9000"].begin()  # a request in flight on the address about to vanish
    asyncio.run(discovery.refresh(target))
    third = pool.find("http://10.0.0.3:9000")
    assert third is not None and third.breaker is not first["http://10.0.0.1:9000"].breaker
    assert pool.find("http://10.0.0.1:9000") is first["http://10.0.0.1:9000"]  # unchanged state kept

    resolver.answer = ["10.0.0.2", "10.0.0.3"]
    asyncio.run(discovery.refresh(target))
    leaving = pool.find("http://10.0.0.1:9000")
    assert leaving is not None and leaving.is_draining and not leaving.is_available()

    resolver.answer = OSError("SERVFAIL")  # a failed resolution changes nothing
    asyncio.run(discovery.refresh(target))
    assert len(pool.backends) == 4 and pool.find("http://10.0.0.2:9000") is not None

    leaving.end(True, 0.01)  # its last request finished: the next resolution removes it
    resolver.answer = ["10.0.0.2", "10.0.0.3"]
    asyncio.run(discovery.refresh(target))
    assert sorted(b.url for b in pool.backends) == ["http://10.0.0.2:9000", "http://10.0.0.3:9000",
                                                   "http://127.0.0.1:9999"]


def test_a_returning_address_is_revived_but_an_admin_drain_is_kept() -> None:
    discovery, resolver, router = _discovery()
    pool = router.pools["m"]
    target = discovery.targets[0]
    resolver.answer = ["10.0.0.1", "10.0.0.2"]
    asyncio.run(discovery.refresh(target))
    one, two = pool.find("http://10.0.0.1:9000"), pool.find("http://10.0.0.2:9000")
    assert one is not None and two is not None
    one.begin()
    router.drain_backend("m", two.url)  # an operator's drain
    resolver.answer = ["10.0.0.2"]
    asyncio.run(discovery.refresh(target))
    assert one.is_draining
    resolver.answer = ["10.0.0.1", "10.0.0.2"]
    asyncio.run(discovery.refresh(target))
    assert not one.is_draining and two.is_draining


def test_empty_answer_keeps_the_last_good_set() -> None:
    discovery, resolver, router = _discovery()
    resolver.answer = ["10.0.0.1"]
    asyncio.run(discovery.refresh(discovery.targets[0]))
    resolver.answer = []
    asyncio.run(discovery.refresh(discovery.targets[0]))
    found = router.pools["m"].find("http://10.0.0.1:9000")
    assert found is not None and not found.is_draining


def test_system_resolver_uses_getaddrinfo() -> None:
    resolver = SystemResolver()
    assert asyncio.run(resolver.resolve("127.0.0.2", 80)) == ["127.0.0.2"]
    assert "127.0.0.1" in asyncio.run(resolver.resolve("localhost", 80))
    with pytest.raises(OSError):
        asyncio.run(resolver.resolve("no-such-host.invalid", 80))


def test_hosts_file_resolver_reads_the_file_each_time(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment pool.test\n127.0.0.2 other pool.test # pod\n\n::1 pool.test\n127.0.0.9 poolxtest\n")
    resolver = HostsFileResolver(hosts)
    assert asyncio.run(resolver.resolve("pool.test", 80)) == ["127.0.0.2", "::1"]
    hosts.write_text("127.0.0.3 pool.test\n")
    assert asyncio.run(resolver.resolve("pool.test", 80)) == ["127.0.0.3"]
    with pytest.raises(OSError):
        asyncio.run(resolver.resolve("missing.test", 80))


# End to end: real servers on three loopback addresses, one port, behind one name.

def _port_free_everywhere() -> int:
    for _ in range(100):
        port = free_port()
        if all(is_port_free(port, host) for host in HOSTS):
            return port
    raise RuntimeError("no port free on every loopback address")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[Process]]]:
    from tests.tiny_models import build_model

    model = tmp_path_factory.mktemp("discovery-model")
    build_model("llama3", model)
    port = _port_free_everywhere()

    def start(host: str) -> Process:
        args = python_module("lmserve.cli", "serve", str(model), "--host", host, "--port", str(port),
                             "--served-model-name", "tiny", "--num-blocks", "256",
                             # Plain PyTorch: this test is about the gateway, not worth a kernel build.
                             "--attention-backend", "torch", "--linear-backend", "torch")
        return start_process(args, port, tmp_path_factory.mktemp(f"serve-{host}") / "server.log",
                             ready_path="/ready", timeout=300, host=host)

    with concurrent.futures.ThreadPoolExecutor(len(HOSTS)) as pool:
        started = list(pool.map(start, HOSTS))
    yield port, started
    for server in started:
        server.stop()


def _write_hosts(path: Path, hosts: tuple[str, ...]) -> None:
    """Replaces the file at once, so the gateway never reads half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# test hosts file\n" + "".join(f"{h}\tpool.test  # pod\n" for h in hosts))
    os.replace(tmp, path)


def _pool_urls(gateway_url: str) -> list[str]:
    state = httpx.get(gateway_url + "/admin/backends", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=10).json()
    return sorted(b["url"] for b in state["models"]["tiny"]["backends"])


def _served_by(gateway_url: str) -> dict[str, float]:
    text = httpx.get(gateway_url + "/metrics", timeout=10).text
    return {backend: float(value) for backend, value in re.findall(
        r'lmserve_gateway_requests_total\{backend="([^"]+)",model="tiny",status="200"\} ([\d.]+)', text)}


def _wait_until(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class _Load:
    """Streams chat completions from two threads until stopped; every stream must end with a reason."""

    def __init__(self, url: str, key: str) -> None:
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
        self.stop = threading.Event()
        self.num_ok = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(2)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                chunks = list(self.client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True))
                if chunks[-1].choices[0].finish_reason is None:
                    self.errors.append("stream ended without a finish_reason")
                else:
                    self.num_ok += 1
            except openai.OpenAIError as exc:
                self.errors.append(repr(exc))

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.mark.slow  # three model servers
def test_scaling_the_name_changes_the_pool_without_a_config_change(servers, tmp_path: Path) -> None:
    port, _ = servers
    urls = [f"http://{h}:{port}" for h in HOSTS]
    hosts_file = tmp_path / "hosts"
    _write_hosts(hosts_file, HOSTS[:2])
    gw_port = free_port()
    config = base_config(tmp_path, [{"name": "tiny", "backends": [
        {"url": f"http://pool.test:{port}", "discovery": "dns", "resolve_interval": 0.2}]}],
        port=gw_port)
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    gateway = start_process(python_module("tests.gateway.dns_gateway", "--config", str(config_path),
                                          "--hosts-file", str(hosts_file)), gw_port, tmp_path / "gateway.log")
    try:
        assert _pool_urls(gateway.url) == urls[:2]  # resolved before the gateway answered
        key = httpx.post(gateway.url + "/admin/keys", json={"name": "load"}, timeout=10,
                         headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["key"]
        with _Load(gateway.url, key) as load:
            _wait_until(lambda: load.num_ok >= 4, "requests through the first two servers")
            _write_hosts(hosts_file, HOSTS)  # scale out 2 -> 3
            _wait_until(lambda: _pool_urls(gateway.url) == urls, "the third address in the pool")
            _wait_until(lambda: _served_by(gateway.url).get(urls[2], 0) >= 2, "traffic on the new server")

            _write_hosts(hosts_file, HOSTS[1:])  # scale in: 127.0.0.1 leaves
            _wait_until(lambda: _pool_urls(gateway.url) == urls[1:], "the vanished address removed")
            num_ok_then = load.num_ok
            _wait_until(lambda: load.num_ok >= num_ok_then + 2, "requests after the scale-in")
            served_then = _served_by(gateway.url).get(urls[0], 0)  # its last requests are counted by now
            _wait_until(lambda: load.num_ok >= num_ok_then + 8, "more requests after the scale-in")
        assert load.errors == []
        assert _served_by(gateway.url).get(urls[0], 0) == served_then  # nothing new went to it
        metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
        healthy = re.findall(r'lmserve_gateway_backend_healthy\{[^}]*backend="([^"]+)"', metrics)
        assert sorted(healthy) == urls[1:]  # the removed backend's series is gone
        log = gateway.log()
        assert f"backend {urls[0]} of 'tiny' left DNS: draining" in log
        assert f"backend {urls[0]} of 'tiny' drained: removed" in log
    finally:
        gateway.stop()
