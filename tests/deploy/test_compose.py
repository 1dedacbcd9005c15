"""The compose stack for real: build the images, `docker compose up --wait`, a key and a chat
through both gateway replicas, every Prometheus target up, and the backend-down alert reaching a
webhook through Alertmanager when a server container is killed, then resolving when it is back.

Grafana is the one service not started: no Grafana build can be installed here (INFRA.md). Its
dashboards are checked against the live Prometheus by the dashboard tests instead.
"""

from __future__ import annotations

import ipaddress
import json
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.deploy.docker_env import Dockerd, cache_dir, cache_lock, serve_directory, wheelhouse
from tests.services import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
PROJECT = "lmserve-test"
# Everything but Grafana (see the module docstring); db-init comes with the gateway.
SERVICES = ["server-1", "server-2", "gateway", "redis", "postgres", "prometheus", "alertmanager"]
SERVICE_IMAGES = {"redis": "lmserve/redis:local", "postgres": "lmserve/postgres:local",
                  "prometheus": "lmserve/prometheus:local", "alertmanager": "lmserve/alertmanager:local"}
# Small batches, so that a few streams make requests wait: the autoscaling signal under load.
MAX_NUM_SEQS = 2


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Polls `check` until it returns something truthy; fails with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"{what}: not after {timeout} s (last: {last!r})")


class Webhook:
    """An Alertmanager webhook receiver: keeps every notification it is sent."""

    def __init__(self, host: str, port: int) -> None:
        self.payloads: list[dict[str, Any]] = []
        received = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        return [alert for payload in list(self.payloads) for alert in payload["alerts"]
                if alert["labels"].get("alertname") == name and alert["status"] == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 for the compose network that no interface of this machine uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        subnet = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        if f"{str(subnet.network_address).rsplit('.', 1)[0]}." not in used:
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet")


def _write_test_configs(tmp: Path, subnet: ipaddress.IPv4Network, webhook_port: int) -> Path:
    """The compose file's own Prometheus config with 2 s intervals, an Alertmanager that sends to
    the test's webhook at once, no host ports, a fixed subnet (its .1 is the host), and servers
    that run MAX_NUM_SEQS sequences at a time."""
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    prometheus["global"] = {"scrape_interval": "2s", "evaluation_interval": "2s"}
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            sd["refresh_interval"] = "2s"
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus))
    host = subnet.network_address + 1
    alertmanager = {
        "route": {"receiver": "test", "group_by": ["alertname", "instance"],
                  "group_wait": "1s", "group_interval": "2s", "repeat_interval": "1h"},
        "receivers": [{"name": "test", "webhook_configs": [
            {"url": f"http://{host}:{webhook_port}/alerts", "send_resolved": True}]}],
    }
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager))
    rules = REPO_ROOT / "deploy" / "prometheus" / "rules"
    override = tmp / "compose.test.yml"
    override.write_text(f"""
services:
  server-1:
    environment:
      LMSERVE_MAX_NUM_SEQS: "{MAX_NUM_SEQS}"
  server-2:
    environment:
      LMSERVE_MAX_NUM_SEQS: "{MAX_NUM_SEQS}"
  gateway:
    ports: !reset []
  prometheus:
    ports: !reset []
    volumes: !override
      - {tmp / 'prometheus.yml'}:/etc/prometheus/prometheus.yml:ro
      - {rules}:/etc/prometheus/rules:ro
  alertmanager:
    ports: !reset []
    volumes: !override
      - {tmp / 'alertmanager.yml'}:/etc/alertmanager/alertmanager.yml:ro
networks:
  default:
    ipam:
      config:
        - subnet: {subnet}
""")
    return override


class Compose:
    """`docker compose` on the test project, with the repository's file and the test override."""

    def __init__(self, dockerd: Dockerd, override: Path, admin_key: str) -> None:
        binary = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or "docker-compose"
        self.base = [binary, "-p", PROJECT, "-f", str(COMPOSE_DIR / "docker-compose.yml"), "-f", str(override)]
        self.dockerd = dockerd
        self.env = {**dockerd.env, "LMSERVE_ADMIN_KEY": admin_key}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            logs = subprocess.run([*self.base, "logs", "--tail", "40"], capture_output=True, text=True,
                                  env=self.env, timeout=120).stdout
            raise RuntimeError(f"compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}\n"
                               f"--- logs ---\n{logs[-8000:]}")
        return done

    def ips(self, service: str) -> list[str]:
        """The addresses of a service's containers on the project network, replica order."""
        ids = self("ps", "-q", service).stdout.split()
        inspected = json.loads(self.dockerd.docker(["inspect", *ids]).stdout)
        inspected.sort(key=lambda c: c["Name"])
        return [next(iter(c["NetworkSettings"]["Networks"].values()))["IPAddress"] for c in inspected]


def build_images(dockerd: Dockerd, wheels: Path) -> None:
    """Builds every image of the stack; layers are cached in the daemon's data root between runs."""
    services_file = REPO_ROOT / "deploy" / "docker" / "services.Dockerfile"
    for target, tag in SERVICE_IMAGES.items():
        dockerd.build(tag, services_file, services_file.parent, target=target)
    with serve_directory(wheels) as url:
        dockerd.build("lmserve:cpu", REPO_ROOT / "deploy" / "docker" / "Dockerfile", REPO_ROOT,
                      {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": url})
    # Each change of lmserve's code leaves a ~3 GB image and its build cache behind in the cached
    # data root: keep the newest layers only.
    dockerd.docker(["image", "prune", "-f"])
    dockerd.docker(["builder", "prune", "-f", "--keep-storage", "8GB"])


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    subprocess.run([str(REPO_ROOT / "scripts" / "install-test-deps.sh")], check=True)
    cache = cache_dir()
    with cache_lock(cache):
        daemon = Dockerd(cache / "docker", address_pool="10.199.0.0/16")
        daemon.start()
        try:
            daemon.import_base(cache)
            build_images(daemon, wheelhouse(cache, daemon))
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="module")
def stack(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("compose")
    subnet = _free_subnet()
    webhook_host = str(subnet.network_address + 1)
    admin_key = secrets.token_urlsafe(16)
    # The webhook can only bind the network's host address once compose has made the network,
    # so its port is fixed now and the server bound after `up`.
    webhook_port = random.randint(20000, 40000)
    compose = Compose(dockerd, _write_test_configs(tmp, subnet, webhook_port), admin_key)
    compose("down", "-v", "--remove-orphans", timeout=300)  # a run that was killed may have left it
    try:
        compose("up", "-d", "--wait", "--no-build", *SERVICES, timeout=900)
        webhook = Webhook(webhook_host, webhook_port)
        try:
            yield {"compose": compose, "admin_key": admin_key, "webhook": webhook}
        finally:
            webhook.close()
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300, check=False)



def _create_key(gateway_ip: str, admin_key: str) -> str:
    response = httpx.post(f"http://{gateway_ip}:8080/admin/keys", json={"name": "compose-test"},
                          headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["key"]


def _chat(gateway_ip: str, key: str, content: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"http://{gateway_ip}:8080/v1", api_key=key, timeout=60, max_retries=0)
    return client.chat.completions.create(model="lmserve-demo", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": content}])


def test_key_from_one_gateway_replica_chats_through_both(stack: dict[str, Any]) -> None:
    gateway_ips = stack["compose"].ips("gateway")
    assert len(gateway_ips) == 2
    key = _create_key(gateway_ips[0], stack["admin_key"])
    for i, ip in enumerate(gateway_ips):
        # The second replica knows the key only through the shared PostgreSQL.
        reply = _chat(ip, key, f"Hello from replica {i}")
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0
    stack["key"] = key


def _targets(prometheus: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/targets", params={"state": "active"}, timeout=10)
    return response.json()["data"]["activeTargets"]


def test_prometheus_scrapes_every_server_and_gateway_replica(stack: dict[str, Any]) -> None:
    compose = stack["compose"]
    prometheus = f"http://{compose.ips('prometheus')[0]}:9090"
    stack["prometheus"] = prometheus
    expected = {
        "lmserve-server": {f"server-{i}:8000" for i in (1, 2)},
        "lmserve-gateway": {f"{ip}:8080" for ip in compose.ips("gateway")},
    }

    def all_up() -> bool:
        targets = _targets(prometheus)
        by_job = {job: {t["labels"]["instance"] for t in targets if t["labels"]["job"] == job} for job in expected}
        return by_job == expected and all(t["health"] == "up" for t in targets)

    wait_for("every target scraped and up", all_up, timeout=60)
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": "up"}, timeout=10).json()["data"]["result"]
    assert {(r["metric"]["job"], r["value"][1]) for r in result} >= {("lmserve-server", "1"), ("lmserve-gateway", "1")}
    assert all(r["value"][1] == "1" for r in result), result
    assert len(result) == len(_targets(prometheus))


def _adapter_query(matchers: str, group_by: str) -> str:
    """The Prometheus Adapter rule the Helm chart ships, as the adapter expands it for a query."""
    from tests.deploy.helm_render import by_kind, render_file

    (adapter,) = [c for c in by_kind(render_file("values-prod.yaml"), "ConfigMap")
                  if c["metadata"]["name"].endswith("prometheus-adapter")]
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    series = rule["seriesQuery"].split("{", 1)[0]
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", group_by))


def _stream_until(gateway_ip: str, key: str, stop: threading.Event, errors: list[BaseException]) -> None:
    """Keeps one long stream going until `stop` is set (a new one when a stream ends)."""
    client = openai.OpenAI(base_url=f"http://{gateway_ip}:8080/v1", api_key=key, timeout=120, max_retries=0)
    while not stop.is_set():
        try:
            stream = client.chat.completions.create(
                model="lmserve-demo", max_tokens=400, stream=True,
                messages=[{"role": "user", "content": "Tell me a long story."}])
            for _ in stream:
                if stop.is_set():
                    stream.close()
                    return
        except openai.OpenAIError as exc:
            errors.append(exc)
            return


def test_autoscaling_rule_reads_each_server_s_waiting_requests_under_load(stack: dict[str, Any]) -> None:
    """The HPA's signal for real: under more streams than the servers run at once, the chart's
    adapter rule gives one waiting-requests value per server, the same the servers export."""
    compose, prometheus = stack["compose"], stack["prometheus"]
    query = _adapter_query('job="lmserve-server"', "instance")

    def per_server() -> dict[str, float]:
        result = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10).json()
        return {r["metric"]["instance"]: float(r["value"][1]) for r in result["data"]["result"]}

    def exported(ip: str) -> float:
        text = httpx.get(f"http://{ip}:8000/metrics", timeout=10).text
        (line,) = [x for x in text.splitlines() if x.startswith("lmserve:num_requests_waiting")]
        return float(line.rsplit(" ", 1)[1])

    servers = {f"{name}:8000": compose.ips(name)[0] for name in ("server-1", "server-2")}
    assert set(per_server()) == set(servers)
    stop, errors = threading.Event(), []
    gateways = compose.ips("gateway")
    # 4 streams per server where each runs MAX_NUM_SEQS: about 2 wait on each.
    streams = [threading.Thread(target=_stream_until, args=(gateways[i % 2], stack["key"], stop, errors))
               for i in range(4 * MAX_NUM_SEQS)]
    for thread in streams:
        thread.start()
    try:
        wait_for("waiting requests on both servers, through the adapter rule",
                 lambda: (lambda v: v if set(v) == set(servers) and min(v.values()) >= 1 else None)(
                     per_server()), timeout=120)
        # What Prometheus read is what each server says (the streams keep the queues full).
        assert all(wait_for(f"{name} exports waiting requests", lambda ip=ip: exported(ip) >= 1, timeout=30)
                   for name, ip in servers.items())
        # No bound on the sum: each server is scraped at its own moment, so a stream that ended on one
        # and restarted on the other between the two scrapes counts on both (seen: 5 of 8 streams).
    finally:
        stop.set()
        for thread in streams:
            thread.join(180)
    assert not errors, errors
    wait_for("queues empty again, through the adapter rule",
             lambda: (lambda v: set(v) == set(servers) and max(v.values()) == 0)(per_server()), timeout=120)


def test_killed_server_fires_backend_down_through_alertmanager_and_resolves(stack: dict[str, Any]) -> None:
    compose, webhook = stack["compose"], stack["webhook"]
    down = {"alertname": "LmserveBackendDown", "job": "lmserve-server", "instance": "server-1:8000"}

    def matching(status: str) -> list[dict[str, Any]]:
        return [a for a in webhook.alerts("LmserveBackendDown", status) if down.items() <= a["labels"].items()]

    assert not matching("firing"), "the alert fired before any server was killed"
    compose("kill", "server-1")
    state = json.loads(compose.dockerd.docker(["inspect", compose("ps", "-aq", "server-1").stdout.split()[0]]).stdout)
    assert not state[0]["State"]["Running"]
    wait_for("LmserveBackendDown firing at the webhook", lambda: matching("firing"), timeout=180)
    assert not matching("resolved")
    # The stack still answers: the gateway sends everything to server-2.
    assert _chat(compose.ips("gateway")[1], stack["key"], "Still there?").choices[0].message.content

    compose("start", "server-1")
    wait_for("LmserveBackendDown resolved at the webhook", lambda: matching("resolved"), timeout=300)
