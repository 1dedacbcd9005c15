"""A live tiny server behind a real gateway, with traffic that produces every kind of metric, and a
real Prometheus scraping both under the job names the deploy artifacts use."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI, RateLimitError
from openai.types import CompletionUsage

from tests.conftest import serve_args
from tests.gateway.conftest import GatewayProc, base_config
from tests.services import Process, free_port, python_module, start_process
from tests.tiny_models import build_model

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
DASHBOARDS_DIR = REPO / "deploy" / "grafana" / "dashboards"


def require_tool(name: str) -> str:
    """The path of a program the deploy tests need; fails (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run scripts/install-test-deps.sh")
    return path


@dataclass
class Traffic:
    """What `drive_traffic` sent: the main key, and per key id the (prompt, completion, cached) tokens
    the server reported for the requests it answered (cache hits excluded), and the 429s it got."""

    key: str
    reported: dict[str, list[int]]
    num_rate_limited: dict[str, int]


@dataclass
class LiveStack:
    server: Process
    gateway: GatewayProc
    traffic: Traffic

    def scrape(self, proc_url: str) -> str:
        response = httpx.get(proc_url + "/metrics", timeout=10)
        response.raise_for_status()
        return response.text


def start_gateway(tmp: Path, config: dict, name: str = "gw", scheme: str = "http") -> GatewayProc:
    port = free_port()
    config = {**config, "port": port}
    path = tmp / f"{name}-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = start_process(python_module("lmserve.cli", "gateway", "--config", str(path)), port,
                         tmp / f"{name}-{port}.log", scheme=scheme)
    return GatewayProc(proc, config, path)


def _create_key(gateway: GatewayProc, **fields: object) -> tuple[str, str]:
    response = gateway.admin("POST", "/admin/keys", json=fields)
    response.raise_for_status()
    return response.json()["key"], response.json()["id"]


def _add_usage(total: list[int], usage: CompletionUsage | None) -> None:
    assert usage is not None
    details = usage.prompt_tokens_details
    for index, value in enumerate((usage.prompt_tokens, usage.completion_tokens,
                                   (details.cached_tokens or 0) if details else 0)):
        total[index] += value


def drive_traffic(gateway: GatewayProc) -> Traffic:
    """Plain, streamed, cached and rate-limited requests through the gateway, with two keys."""
    key, key_id = _create_key(gateway, name="dashboards", tenant="acme")
    limited_key, limited_id = _create_key(gateway, name="limited", rpm=1)
    traffic = Traffic(key, {key_id: [0, 0, 0], limited_id: [0, 0, 0]}, {key_id: 0, limited_id: 0})
    client = OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "Hello there"}]
    for _ in range(2):  # the second one is a cache hit (temperature 0)
        raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=8,
                                                               temperature=0)
        if "x-lmserve-cache" not in raw.headers:
            _add_usage(traffic.reported[key_id], raw.parse().usage)
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            _add_usage(traffic.reported[key_id], chunk.usage)
    limited = OpenAI(base_url=gateway.url + "/v1", api_key=limited_key, max_retries=0)
    answer = limited.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0.5)
    _add_usage(traffic.reported[limited_id], answer.usage)
    with pytest.raises(RateLimitError):
        limited.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0.5)
    traffic.num_rate_limited[limited_id] += 1
    return traffic


def start_tiny_server(tmp: Path) -> Process:
    """A server on a tiny Llama with PyTorch ops (no wait on a C++ kernel build: these tests are about
    metrics); its readiness deadline allows for a machine shared with other jobs."""
    model = tmp / "model"
    build_model("llama3", model)
    port = free_port()
    args = serve_args(model, port, "--attention-backend", "torch", "--linear-backend", "torch")
    return start_process(args, port, tmp / "server.log", ready_path="/ready", timeout=300)


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp("live-stack")
    server = start_tiny_server(tmp)
    config = base_config(tmp, [{"name": "tiny", "backends": [{"url": server.url}]}], cache={"enabled": True})
    try:
        gateway = start_gateway(tmp, config)
        try:
            yield LiveStack(server, gateway, drive_traffic(gateway))
        finally:
            gateway.proc.stop()
    finally:
        server.stop()


@dataclass
class LivePrometheus:
    url: str

    def query(self, expr: str) -> dict:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        return response.json()


def _wait_for_scrapes(prom: LivePrometheus, popen: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until both jobs are up and have been scraped at least 3 times (so rate() has points)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
        try:
            result = prom.query('count_over_time(up{job=~"lmserve-server|lmserve-gateway"}[1m]) >= 3 '
                                'and up == 1')["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError):  # ValueError: a plain-text 503 while starting
            result = []
        if len(result) == 2:
            return
        time.sleep(0.5)
    raise RuntimeError(f"prometheus never scraped both targets: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def live_prometheus(live_stack: LiveStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LivePrometheus]:
    binary = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    targets = {"lmserve-server": live_stack.server.url, "lmserve-gateway": live_stack.gateway.url}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in sorted(RULES_DIR.glob("*.yml"))],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [url.split("://", 1)[1]]}]}
                           for job, url in targets.items()],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                                  f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                 stdout=out, stderr=subprocess.STDOUT)
    prom = LivePrometheus(f"http://127.0.0.1:{port}")
    try:
        _wait_for_scrapes(prom, popen, log)
        yield prom
    finally:
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)
