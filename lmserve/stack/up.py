"""Starts model servers, then the gateway in front of them; supervises; stops in order."""

from __future__ import annotations

import datetime
import json
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lmserve.settings import lmserve_home
from lmserve.stack.config import ModelDeployment, StackConfig
from lmserve.stack.supervisor import Child, HealthWatch, Supervisor

SERVER_READY_TIMEOUT = 600.0
GATEWAY_READY_TIMEOUT = 60.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmserve.cli", *args]


def serve_flags(settings: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def _private_file(path: Path, make: Callable[[], str]) -> str:
    """The content of a 0600 file, created with `make()` the first time."""
    if not path.exists():
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


class Stack:
    """The processes of one `lmserve up`. Invariant: the gateway starts only after every server is ready."""

    def __init__(self, config: StackConfig, say: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = say
        self.home = config.home_dir
        self.logs = self.home / "logs"
        watch = HealthWatch(config.health_check_interval, config.health_check_timeout,
                            config.restart_unhealthy_after, SERVER_READY_TIMEOUT)
        self.supervisor = Supervisor(config.restart_backoff_max, say, watch)
        self.servers: list[tuple[ModelDeployment, int, Child]] = []
        self.gateway: Child | None = None
        self.backend_key = ""
        """Bearer key of every server, sent by the gateway (created in `start`)."""
        self.database_url = config.database_url or f"sqlite:///{self.home / 'keys.db'}"

    @property
    def gateway_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.config.port}"

    def server_urls(self, model: ModelDeployment) -> list[str]:
        return [f"http://127.0.0.1:{port}" for m, port, _ in self.servers if m is model]

    def start(self) -> str:
        """Starts everything and returns the API key to print. Raises RuntimeError if a part fails."""
        self.home.mkdir(parents=True, exist_ok=True)
        # The servers trust the tenant and priority the gateway sends only from a holder of their key.
        self.backend_key = _private_file(self.home / "backend_key", lambda: "srv-" + secrets.token_urlsafe(24))
        self._start_servers()
        gateway_file = self._write_gateway_config()
        api_key = self.config.api_key or self._create_key()
        self.gateway = self.supervisor.add(
            Child("gateway", cli("gateway", "-c", str(gateway_file), *self._shared_flags(),
                                 "--host", self.config.host, "--port", str(self.config.port)),
                  self.logs / "gateway.log",
                  self.gateway_url + "/ready")
        )
        self.supervisor.wait_ready([self.gateway], GATEWAY_READY_TIMEOUT)
        return api_key

    def _start_servers(self) -> None:
        port = self.config.first_server_port or self.config.port + 100
        for model in self.config.models:
            if model.on_demand:
                continue  # the gateway starts it (_launch)
            for replica in range(model.replicas):
                args = self._serve_args(model, str(port))
                name = f"{model.name}-{replica}"
                child = Child(name, args, self.logs / f"{name}.log", f"http://127.0.0.1:{port}/ready",
                              env={"LMSERVE_API_KEY": self.backend_key},  # in env, not on `ps` output
                              health_url=f"http://127.0.0.1:{port}/health")
                self.servers.append((model, port, self.supervisor.add(child)))
                port += 1
        self.say(f"starting {len(self.servers)} model server(s); logs in {self.logs}")
        self.supervisor.wait_ready([c for _, _, c in self.servers], SERVER_READY_TIMEOUT)

    def _serve_args(self, model: ModelDeployment, port: str) -> list[str]:
        # Flags, not the inherited LMSERVE_* environment, say where a server listens.
        return cli("serve", model.model, "--port", port, "--host", "127.0.0.1", "--served-model-name", model.name,
                   *self._shared_flags(), *serve_flags(model.serve))

    def _launch(self, model: ModelDeployment) -> dict[str, Any]:
        """The gateway's `launch` entry for an on_demand model: the same server command, on a port the
        gateway picks."""
        return {"command": self._serve_args(model, "{port}"), "env": {"LMSERVE_API_KEY": self.backend_key},
                "api_key": self.backend_key, "memory": model.memory, "idle_unload": model.idle_unload,
                "load_timeout": SERVER_READY_TIMEOUT, "log_file": str(self.logs / f"{model.name}.log")}

    def _shared_flags(self) -> list[str]:
        """Settings the stack hands to the gateway and every server under the same names."""
        return ["--drain-seconds", str(self.config.drain_seconds), "--log-level", self.config.log_level]

    def _write_gateway_config(self) -> Path:
        admin_key = _private_file(self.home / "admin_key", lambda: "adm-" + secrets.token_urlsafe(24))
        models = [
            {"name": m.name, "strategy": m.strategy, "launch": self._launch(m)} if m.on_demand else
            {"name": m.name, "strategy": m.strategy,
             "backends": [{"url": url, "api_key": self.backend_key} for url in self.server_urls(m)]}
            for m in self.config.models
        ]
        config: dict[str, Any] = {
            "host": self.config.host, "port": self.config.port, "database_url": self.database_url,
            "admin_key": admin_key, "models": models,
            # A replica that dies (refused, "dead") is out within about two seconds, not ten; one that
            # is merely slow to answer probes under load stays in until three of them time out.
            "health": {"probe_interval": 1.0, "unhealthy_after": 2, "timeout_unhealthy_after": 3, "cooldown": 3.0},
        }
        if self.config.redis_url:
            config["redis_url"] = self.config.redis_url
        if self.config.memory_budget is not None:
            config["launch_memory_budget"] = self.config.memory_budget
        config = _merge(config, self.config.gateway)
        path = self.home / "gateway.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def _create_key(self) -> str:
        name = "lmserve-up-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        done = subprocess.run(cli("keys", "create", "--name", name, "--database-url", self.database_url),
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"creating an API key failed: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)["key"]

    def supervise(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.supervisor.check()
            stop.wait(0.5)

    def stop(self) -> None:
        """Gateway first (it drains its in-flight requests), then the servers (they drain too)."""
        if self.gateway is not None:
            self.supervisor.stop([self.gateway], self.config.drain_seconds + 5)
        self.supervisor.stop([c for _, _, c in self.servers], self.config.drain_seconds + 5)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _config_flag(stack: Stack) -> str:
    """`lmserve keys` finds the default home's gateway config by itself; another home needs -c."""
    if stack.home.resolve() == lmserve_home().resolve():
        return ""
    return f" -c {stack.home / 'gateway.yaml'}"


def banner(stack: Stack, api_key: str) -> str:
    model = stack.config.models[0].name
    url = stack.gateway_url
    return "\n".join([
        "",
        f"lmserve is up: gateway {url}/v1 in front of "
        + ", ".join(f"{m.replicas} x {m.name}" for m in stack.config.models),
        f"  API key:     {api_key}",
        *(f"  servers:     {m.name}: {', '.join(stack.server_urls(m)) or 'on demand (the gateway starts it)'}"
          for m in stack.config.models),
        f"  metrics:     {url}/metrics",
        f"  console:     {url}/ui",
        f"  logs:        {stack.logs}",
        f"  admin key:   {stack.home / 'admin_key'}",
        f"  more keys:   lmserve keys create --name NAME{_config_flag(stack)}",
        "  try:",
        f"    curl {url}/v1/chat/completions -H 'Authorization: Bearer {api_key}' \\",
        "      -H 'Content-Type: application/json' \\",
        f"      -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        "  Ctrl-C stops everything (draining first).",
        "",
    ])


def run_up(config: StackConfig, say: Callable[[str], None] = print) -> int:
    stack = Stack(config, say)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        api_key = stack.start()
    except RuntimeError as exc:
        say(f"lmserve up: error: {exc}")
        stack.stop()
        return 1
    say(banner(stack, api_key))
    stack.supervise(stop)
    say("stopping: draining the gateway, then the servers")
    stack.stop()
    say("stopped")
    return 0
