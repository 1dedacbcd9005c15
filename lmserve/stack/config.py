"""The stack file: which models, how many replicas, the gateway in front."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.settings import SettingsSpec, check_log_level, layered, lmserve_home, spec_from_dataclass

STRATEGIES = ("round_robin", "least_outstanding", "latency", "prefix_affinity", "weighted")


@dataclass
class ModelDeployment:
    """One model served by `replicas` server processes behind the gateway."""

    name: str
    """The model name clients send to the gateway."""
    model: str = "demo"
    """What `lmserve serve` loads: a model directory, a Hub id, or demo."""
    replicas: int = 2
    """Server processes for this model."""
    strategy: str = "least_outstanding"
    """How the gateway spreads requests over the replicas."""
    serve: dict[str, Any] = field(default_factory=dict)
    """Extra `lmserve serve` settings for every replica (e.g. max_num_seqs: 64)."""
    on_demand: bool = False
    """The gateway starts this model's server at its first request (holding it meanwhile) and stops it
    when idle or to make room under `memory_budget`; one server, so `replicas` must be 1."""
    memory: float = 1.0
    """on_demand: GiB the model takes once loaded, counted against `memory_budget`."""
    idle_unload: float = 300.0
    """on_demand: seconds without requests before its server stops; 0: never (until room is needed)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("every model needs a name")
        if self.replicas < 1:
            raise ValueError(f"model {self.name!r}: replicas must be >= 1, got {self.replicas}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"model {self.name!r}: strategy must be one of {', '.join(STRATEGIES)}")
        if self.on_demand and self.replicas != 1:
            raise ValueError(f"model {self.name!r}: an on_demand model has one server; set replicas: 1")
        if self.memory <= 0 or self.idle_unload < 0:
            raise ValueError(f"model {self.name!r}: memory must be > 0 and idle_unload >= 0")
        for key in ("port", "served_model_name", "model", "host", "api_key"):
            if key in self.serve:
                raise ValueError(f"model {self.name!r}: serve.{key} is set by the stack itself")


@dataclass
class StackConfig:
    """Everything `lmserve up` starts."""

    models: list[ModelDeployment] = field(default_factory=lambda: [ModelDeployment(name="lmserve-demo")])
    """The models and their replicas."""
    host: str = "127.0.0.1"
    """Address the gateway listens on (servers always listen on 127.0.0.1)."""
    port: int = 8000
    """Gateway port."""
    first_server_port: int | None = None
    """Servers take consecutive ports from here; default: the gateway port + 100."""
    home: str | None = None
    """Where keys, logs and generated configs live; default $LMSERVE_HOME or ~/.lmserve."""
    api_key: str | None = None
    """An existing gateway key to print instead of creating a fresh one on every start."""
    database_url: str | None = None
    """Key store; default SQLite under home (PostgreSQL URL for several gateways)."""
    redis_url: str | None = None
    """Share rate limits and the response cache through Redis."""
    gateway: dict[str, Any] = field(default_factory=dict)
    """Extra `lmserve gateway` settings merged into the generated gateway config."""
    restart_backoff_max: float = 30.0
    """Longest wait before restarting a crashed process (the wait doubles from 1 s)."""
    drain_seconds: float = 30.0
    """On stop, how long the gateway and then each server may take to finish in-flight requests."""
    log_level: str = "info"
    """debug, info, warning or error: of the gateway and every server."""
    health_check_interval: float = 5.0
    """Seconds between checks of each server's `/health` once it has been ready."""
    health_check_timeout: float = 5.0
    """Seconds a server has to answer `/health` before the check counts as bad."""
    restart_unhealthy_after: int = 3
    """Bad `/health` checks in a row (not 200, or no answer in time) before a server is restarted."""
    memory_budget: float | None = None
    """GiB the on_demand models may take at once (their `memory` summed); the least recently used idle
    one stops to make room. None: no limit."""

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelDeployment) else ModelDeployment(**m) for m in self.models]
        if not self.models:
            raise ValueError("the stack needs at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        check_log_level(self.log_level)
        if self.drain_seconds < 0:
            raise ValueError(f"drain_seconds must be >= 0, got {self.drain_seconds}")
        for name in ("health_check_interval", "health_check_timeout", "restart_backoff_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.restart_unhealthy_after < 1:
            raise ValueError(f"restart_unhealthy_after must be >= 1, got {self.restart_unhealthy_after}")
        if self.first_server_port is None:
            self.first_server_port = self.port + 100
        for port in (self.port, self.first_server_port + self.num_servers - 1):
            if not 0 < port < 65536:
                raise ValueError(f"ports must be in 1..65535, got {port}")
        taken = range(self.first_server_port, self.first_server_port + self.num_servers)
        if self.port in taken:
            raise ValueError(f"gateway port {self.port} collides with server ports {taken.start}-{taken.stop - 1}")

    @property
    def num_servers(self) -> int:
        """Servers the stack starts itself (on_demand ones are the gateway's, on ports it picks)."""
        return sum(m.replicas for m in self.models if not m.on_demand)

    @property
    def home_dir(self) -> Path:
        return Path(self.home).expanduser() if self.home else lmserve_home()


def settings_spec() -> SettingsSpec:
    """The stack's settings for the shared layer. `api_key`, `models` and `gateway` are not read from
    the environment: there LMSERVE_API_KEY is a server's key and LMSERVE_MODELS the gateway's pool."""
    return spec_from_dataclass("up", StackConfig, env_skip=frozenset({"api_key", "models", "gateway"}))


def load_stack_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None,
                      environ: Mapping[str, str] | None = None) -> StackConfig:
    """The built-in default stack, or a YAML file; LMSERVE_* variables and then `overrides` (CLI flags,
    None meaning not given) win. Raises ValueError."""
    data = layered(settings_spec(), overrides or {}, path, environ)
    try:
        return StackConfig(**data)
    except TypeError as exc:
        raise ValueError(f"stack file: {exc}") from None
