"""Gateway configuration: one dataclass per concern, loaded from YAML and overridden by env.

Precedence: flags > environment (`LMSERVE_*`) > YAML file > defaults, through the settings layer
every command shares (lmserve/settings.py).
Every field is validated in `__post_init__` with a `ValueError` a user can act on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lmserve.gateway.model_modes import EnsembleConfig, LaunchConfig
from lmserve.gateway.redact import compile_patterns
from lmserve.settings import SettingsSpec, check_log_level, layered, spec_from_dataclass

STRATEGIES = ("round_robin", "least_outstanding", "latency", "prefix_affinity", "weighted")
DISCOVERY_MODES = ("static", "dns")


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_discoverable(url: str) -> None:
    """Raises ValueError unless `url` names a host that DNS discovery can resolve into pod addresses."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        # The gateway connects to each pod address; TLS would check the certificate against that
        # address instead of the Service name, so https backends stay static.
        raise ValueError(f"backend {url}: discovery: dns needs an http:// URL (https backends are static)")
    try:
        ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        return
    raise ValueError(f"backend {url}: discovery: dns needs a host name, not an address; use discovery: static")


@dataclass
class BackendConfig:
    """One OpenAI-compatible server in a model's pool."""

    url: str
    """Base URL, e.g. `http://10.0.0.5:8000` (the gateway appends `/v1/...`)."""
    weight: float = 1.0
    """Share of traffic for `weighted` (and the canary split); must be > 0."""
    api_key: str | None = None
    """Bearer token the gateway sends upstream instead of the client's credential."""
    discovery: str = "static"
    """static (the URL is one backend) or dns (every address its host name resolves to is a backend,
    as for a Kubernetes headless Service; re-resolved every `resolve_interval`)."""
    resolve_interval: float = 10.0
    """discovery: dns: seconds between resolutions of the host name; must be > 0."""

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {self.url!r}")
        self.url = self.url.rstrip("/")
        _positive("backend weight", self.weight)
        _positive("backend resolve_interval", self.resolve_interval)
        if self.discovery not in DISCOVERY_MODES:
            raise ValueError(f"backend {self.url}: discovery must be one of {DISCOVERY_MODES}, got {self.discovery!r}")
        if self.discovery == "dns":
            check_discoverable(self.url)


@dataclass
class ModelConfig:
    """A model name clients ask for, served by a pool of backends."""

    name: str
    """The `model` value clients send."""
    backends: list[BackendConfig] = field(default_factory=list)
    """The pool; may start empty and be filled through `/admin/backends`."""
    strategy: str = "round_robin"
    """One of round_robin, least_outstanding, latency, prefix_affinity, weighted."""
    upstream_model: str | None = None
    """Model name sent to the backends when it differs from `name`."""
    aliases: list[str] = field(default_factory=list)
    """Other names that resolve to this model."""
    fallbacks: list[str] = field(default_factory=list)
    """Models tried in order when this one has no healthy backend or fails before the first byte."""
    max_in_flight: int | None = None
    """Cap on concurrent requests; over it lower priorities are shed first (429)."""
    prefix_chars: int = 256
    """prefix_affinity: characters of the prompt hashed when no `X-Session-ID` is sent."""
    load_factor: float = 1.25
    """prefix_affinity: a backend takes at most this times the mean in-flight load (bounded load)."""
    launch: LaunchConfig | None = None
    """Load on demand: the gateway starts this model's server at its first request and stops it
    when idle or to make room (no `backends` then)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("every model needs a non-empty name")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"model {self.name!r}: strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        self.backends = [b if isinstance(b, BackendConfig) else BackendConfig(**b) for b in self.backends]
        _positive("max_in_flight", self.max_in_flight)
        _positive("prefix_chars", self.prefix_chars)
        if self.load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1.0, got {self.load_factor}")
        if isinstance(self.launch, dict):
            self.launch = _build(LaunchConfig, dict(self.launch), f"model {self.name!r}: launch")
        if self.launch is not None and self.backends:
            raise ValueError(f"model {self.name!r}: a model with `launch` has no `backends` (the gateway starts its server)")


@dataclass
class TimeoutsConfig:
    """Upstream timeouts in seconds."""

    connect: float = 2.0
    """TCP connect to a backend."""
    first_byte: float = 60.0
    """Streams only: from sending the request to the first body byte (a stream that stays silent longer
    gets a 504; it is not retried, as the backend may be working on it). Non-streamed requests wait up to
    `total`."""
    total: float = 600.0
    """Whole request including streaming."""
    client_body: float = 30.0
    """Seconds a client may take to send its request body after its head; a slower client gets a 408 and
    its connection closes (a slow-body client cannot hold a connection forever)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            _positive(f"timeouts.{f.name}", getattr(self, f.name))


@dataclass
class RetryConfig:
    """Retries happen only before any byte reached the client, each on another backend."""

    max_attempts: int = 3
    """Attempts per request, the first one included."""
    budget_ratio: float = 0.2
    """Retries may add at most this fraction of the recent request rate."""
    min_retries_per_window: int = 3
    """Retries always allowed per window, so a quiet gateway can still retry."""
    window_seconds: float = 10.0
    """Window over which requests and retries are counted for the budget."""
    retry_on_status: list[int] = field(default_factory=lambda: [429, 502, 503, 504])
    """Backend statuses that are retried (connect errors always are)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("retries.max_attempts must be >= 1")
        _positive("retries.budget_ratio", self.budget_ratio, allow_zero=True)
        _positive("retries.window_seconds", self.window_seconds)


@dataclass
class HealthConfig:
    """Active probes, passive outlier detection and the per-backend circuit breaker."""

    probe_interval: float = 5.0
    """Seconds between probes of `/health` (and `/ready` when the backend has it)."""
    probe_timeout: float = 2.0
    """Seconds before a probe counts as timed out (counted apart from failures)."""
    unhealthy_after: int = 2
    """Failed probes (refused, 5xx) since the last good one before a backend gets no traffic."""
    timeout_unhealthy_after: int = 3
    """Timed-out probes since the last good one before a backend gets no traffic, unless it is the last of its model."""
    consecutive_failures: int = 5
    """Consecutive request failures that open the breaker."""
    error_rate: float = 0.5
    """Error rate over `window_size` recent requests that opens the breaker."""
    window_size: int = 20
    """Requests the error rate is computed over (and the minimum before it is)."""
    cooldown: float = 10.0
    """Seconds an open breaker waits before letting one trial request through (half-open); the trial
    closes it when it succeeds, a streamed one as soon as the backend answers 200."""

    def __post_init__(self) -> None:
        _positive("health.probe_interval", self.probe_interval)
        _positive("health.probe_timeout", self.probe_timeout)
        _positive("health.cooldown", self.cooldown)
        if not 0 < self.error_rate <= 1:
            raise ValueError("health.error_rate must be in (0, 1]")
        if self.consecutive_failures < 1 or self.window_size < 1 or self.unhealthy_after < 1 \
                or self.timeout_unhealthy_after < 1:
            raise ValueError("health.consecutive_failures, window_size, unhealthy_after and timeout_unhealthy_after must be >= 1")


@dataclass
class JWTConfig:
    """JWT bearer tokens as an OAuth2 resource server: HS256 secret or RS256 keys from a JWKS file."""

    secret: str | None = None
    """HS256 shared secret."""
    jwks_file: str | None = None
    """Path of a JWKS JSON file with the RS256 public keys (selected by `kid`)."""
    issuer: str | None = None
    """Required `iss`."""
    audience: str | None = None
    """Required `aud`."""
    tenant_claim: str = "tenant"
    """Claim giving the tenant (defaults to `sub` when absent)."""
    models_claim: str = "models"
    """Claim listing allowed models (absent: all models)."""
    leeway: float = 0.0
    """Seconds of clock skew allowed on exp/nbf."""

    def __post_init__(self) -> None:
        if not self.secret and not self.jwks_file:
            raise ValueError("jwt needs `secret` (HS256) or `jwks_file` (RS256)")


@dataclass
class CacheConfig:
    """Exact-match response cache for deterministic requests (temperature 0 or a fixed seed)."""

    enabled: bool = False
    """Turn the cache on."""
    ttl: float = 300.0
    """Seconds an entry is fresh."""
    stale_ttl: float = 3600.0
    """Seconds past `ttl` an entry may still be served when every backend fails."""
    serve_stale: bool = True
    """Serve a stale entry instead of an error when the backends fail."""
    max_entries: int = 10_000
    """In-process LRU size (Redis relies on its own memory policy)."""

    def __post_init__(self) -> None:
        _positive("cache.ttl", self.ttl)
        _positive("cache.stale_ttl", self.stale_ttl, allow_zero=True)
        _positive("cache.max_entries", self.max_entries)


@dataclass
class RedactionConfig:
    """Output filter: regexes replaced in completions, also across streamed chunks."""

    patterns: list[str] = field(default_factory=list)
    """Python regexes to redact."""
    named_patterns: list[str] = field(default_factory=list)
    """Built-in pattern sets to redact too: email, phone, card_number (Luhn-checked), api_key (sk-..., AKIA..., ghp_..., and similar), bearer_token."""
    replacement: str = "[REDACTED]"
    """Text put in place of each match."""
    max_match_chars: int = 128
    """Longest match expected; streams hold back this many characters per choice."""

    def __post_init__(self) -> None:
        _positive("redaction.max_match_chars", self.max_match_chars)
        compile_patterns(self.patterns, self.named_patterns)  # a bad regex or name: one-line ValueError


@dataclass
class SheddingConfig:
    """Which fraction of a model's `max_in_flight` each priority may fill."""

    high: float = 1.0
    """Fraction of max_in_flight that high-priority requests may fill."""
    normal: float = 0.8
    """Fraction of max_in_flight that normal-priority requests may fill."""
    low: float = 0.5
    """Fraction of max_in_flight that low-priority requests may fill (they are shed first)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0 < value <= 1:
                raise ValueError(f"shedding.{f.name} must be a fraction in (0, 1], got {value}")


@dataclass
class LimitsConfig:
    """Request limits and defaults for principals without their own."""

    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body accepted (413 above)."""
    max_tokens_limit: int = 32_768
    """Largest `max_tokens` / `max_completion_tokens` a request may ask for."""
    max_prompt_chars: int = 1_000_000
    """Largest prompt (all message contents together) in characters."""
    window_seconds: float = 60.0
    """Length of the RPM/TPM window (anchored at a key's first request in the window)."""
    default_rpm: int | None = None
    """RPM for principals without one."""
    default_tpm: int | None = None
    """TPM for principals without one."""

    def __post_init__(self) -> None:
        # A zero window would make every limit meaningless (it used to switch limits off silently).
        for f in fields(self):
            _positive(f"limits.{f.name}", getattr(self, f.name))


@dataclass
class BatchConfig:
    """Asynchronous batch jobs (`/v1/files`, `/v1/batches`): files and jobs live in `database_url`."""

    enabled: bool = True
    """Serve the Files and Batch APIs and run batches in this gateway."""
    max_file_bytes: int = 100 * 1024 * 1024
    """Largest file a client may upload (413 above); files are stored in the database."""
    max_requests: int = 50_000
    """Most requests (lines) one batch input file may hold."""
    concurrency: int = 4
    """Batch requests this gateway runs at once, over all batches (they run at the low priority class)."""
    poll_interval: float = 1.0
    """Seconds between looks for batches to run (new ones in this gateway start at once)."""
    lease_seconds: float = 30.0
    """A batch whose gateway stopped renewing its lease this long ago is taken over by another
    gateway (or by this one after a restart); renewed every third of it."""
    retry_interval: float = 1.0
    """Seconds before a request refused for load or rate (429, 502, 503, 504) is sent again, unless
    the answer's Retry-After says longer; it is retried until the batch's window ends."""

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_requests", "concurrency", "poll_interval", "lease_seconds",
                     "retry_interval"):
            _positive(f"batch.{name}", getattr(self, name))


@dataclass
class GatewayConfig:
    """Everything `lmserve gateway` needs. `models` must name each model (and alias) once."""

    models: list[ModelConfig] = field(default_factory=list)
    canaries: dict[str, dict[str, float]] = field(default_factory=dict)
    """Virtual model -> {real model: weight}: splits traffic between two model versions."""
    ensembles: list[EnsembleConfig] = field(default_factory=list)
    """Model names answered by several models at once (see the entries' keys)."""
    launch_memory_budget: float | None = None
    """GiB that models with `launch` may take at once (their `launch.memory` summed); the least recently
    used idle ones are stopped to make room. None: no limit."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = 8080
    """TCP port to listen on."""
    tls_certfile: str | None = None
    """PEM certificate: terminate HTTPS (with tls_keyfile)."""
    tls_keyfile: str | None = None
    """PEM private key of tls_certfile."""
    database_url: str = "sqlite:///lmserve-gateway.db"
    """SQLAlchemy URL for keys, the usage ledger, and batch files and jobs (`postgresql+psycopg://...` for many gateways)."""
    redis_url: str | None = None
    """When set, rate limits and the cache live in Redis and are shared by every replica."""
    admin_key: str | None = None
    """Bearer token for `/admin/*`; without it the admin API is off."""
    auth_required: bool = True
    """When false, requests without credentials pass as an anonymous principal."""
    key_cache_ttl: float = 5.0
    """Seconds a verified key is trusted before it is re-read (bounds how fast a revocation spreads)."""
    ledger_flush_interval: float = 1.0
    """Seconds between usage-ledger batch writes."""
    drain_seconds: float = 30.0
    """On SIGTERM, how long in-flight requests may take before the gateway exits anyway."""
    access_log: bool = True
    """One JSON line per request."""
    metrics_max_keys: int = 500
    """Keys, and separately tenants, labelled by name in the per-key metrics (first seen first); later ones are `other`."""
    log_level: str = "info"
    """debug, info, warning or error."""
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shedding: SheddingConfig = field(default_factory=SheddingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    redaction: RedactionConfig = field(default_factory=RedactionConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    jwt: JWTConfig | None = None

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelConfig) else ModelConfig(**m) for m in self.models]
        names: set[str] = set()
        for model in self.models:
            for name in (model.name, *model.aliases):
                if name in names:
                    raise ValueError(f"model name or alias {name!r} is defined twice")
                names.add(name)
        for model in self.models:
            for fb in model.fallbacks:
                if fb not in names:
                    raise ValueError(f"model {model.name!r}: fallback {fb!r} is not a configured model")
        for virtual, split in self.canaries.items():
            if virtual in names:
                raise ValueError(f"canary {virtual!r} clashes with a model name")
            for target, weight in split.items():
                if target not in names:
                    raise ValueError(f"canary {virtual!r}: {target!r} is not a configured model")
                _positive(f"canary weight of {target!r}", weight)
        self._check_ensembles(names)
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ValueError("tls_certfile and tls_keyfile go together")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        _positive("drain_seconds", self.drain_seconds, allow_zero=True)
        check_log_level(self.log_level)
        _positive("key_cache_ttl", self.key_cache_ttl, allow_zero=True)
        _positive("ledger_flush_interval", self.ledger_flush_interval)
        _positive("metrics_max_keys", self.metrics_max_keys, allow_zero=True)
        _positive("launch_memory_budget", self.launch_memory_budget)
        for model in self.models:
            if model.launch and self.launch_memory_budget is not None and model.launch.memory > self.launch_memory_budget:
                raise ValueError(f"model {model.name!r}: launch.memory {model.launch.memory} is over "
                                 f"launch_memory_budget {self.launch_memory_budget}: it could never load")


    def _check_ensembles(self, names: set[str]) -> None:
        self.ensembles = [e if isinstance(e, EnsembleConfig) else _build(EnsembleConfig, dict(e), "ensemble")
                          for e in self.ensembles]
        taken = names | set(self.canaries)
        for ensemble in self.ensembles:
            if ensemble.name in taken:
                raise ValueError(f"ensemble {ensemble.name!r} clashes with a model, alias, canary or ensemble name")
            taken.add(ensemble.name)
            for member in ensemble.members:
                if member not in names:
                    raise ValueError(f"ensemble {ensemble.name!r}: member {member!r} is not a configured model")


_NESTED = {
    "timeouts": TimeoutsConfig,
    "retries": RetryConfig,
    "health": HealthConfig,
    "limits": LimitsConfig,
    "shedding": SheddingConfig,
    "cache": CacheConfig,
    "redaction": RedactionConfig,
    "batch": BatchConfig,
    "jwt": JWTConfig,
}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a value of the wrong type met a check (`window_seconds: abc`)
        raise ValueError(f"{where}: a setting has a value of the wrong type: {exc}") from None


def config_from_dict(data: dict[str, Any]) -> GatewayConfig:
    """Builds a validated config from plain data (a parsed YAML document)."""
    data = dict(data)
    for key, cls in _NESTED.items():
        if isinstance(data.get(key), dict):
            data[key] = _build(cls, data[key], key)
    data["models"] = [_build(ModelConfig, dict(m), f"model {m.get('name')!r}") for m in data.get("models", [])]
    for model in data["models"]:
        model.backends = [b if isinstance(b, BackendConfig) else _build(BackendConfig, b, "backend")
                          for b in model.backends]
    return _build(GatewayConfig, data, "gateway config")


def settings_spec() -> SettingsSpec:
    """The gateway's settings for the shared layer: `LMSERVE_<KEY>`, `LMSERVE_<SECTION>__<KEY>`, and the
    former `LMSERVE_GATEWAY_*` variables with a warning; a file may nest them under `gateway:`."""
    return spec_from_dataclass("gateway", GatewayConfig, old_env_prefix="LMSERVE_GATEWAY_", file_root="gateway")


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> GatewayConfig:
    """Flags (`overrides`, None meaning not given) > environment > the YAML file > defaults, validated."""
    return config_from_dict(layered(settings_spec(), overrides or {}, path, env))
