"""Settings of `lmserve serve`: the server's own options plus every engine setting, flat."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lmserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.server.sampling_defaults import GENERATION_CONFIG_MODES
from lmserve.settings import check_log_level, settings_model

ENGINE_MODES = ("process", "thread")


@dataclass
class ServerOptions:
    """How the HTTP server listens and behaves."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """When set, every /v1 request must send 'Authorization: Bearer <api_key>'."""
    served_model_name: str | None = None
    """The model name clients send and see; default: the model argument (lmserve-demo for demo)."""
    tls_certfile: str | None = None
    """PEM certificate: serve HTTPS instead of HTTP (with tls_keyfile). Formerly ssl_certfile."""
    tls_keyfile: str | None = None
    """PEM private key of tls_certfile. Formerly ssl_keyfile."""
    drain_seconds: float = 30.0
    """Seconds SIGTERM waits for in-flight requests before cutting them and exiting. Formerly drain_timeout."""
    max_body_bytes: int = 8 * 2**20
    """Largest request body accepted; larger ones get 413."""
    log_level: str = "info"
    """debug, info, warning or error."""
    warmup: bool = True
    """Run one short generation before reporting ready."""
    generation_config: str = "auto"
    """auto: a request that omits temperature, top_p, top_k, min_p or repetition_penalty gets the value
    in the model's generation_config.json, as vLLM does (do_sample there is ignored); none: OpenAI's
    defaults (temperature 1, top_p 1, no top-k, min-p or repetition penalty). Request values always win."""
    engine_mode: str = "process"
    """process: the engine steps in a child process of its own; thread: on a thread beside the
    HTTP event loop, sharing its GIL (see benchmarks/README.md for which is faster)."""
    trust_client_identity: bool = False
    """Honour the priority and tenant a client writes itself (body priority and tenant, X-Priority,
    X-Tenant headers). Off: they are ignored, and only a gateway holding api_key sets them (its
    X-Lmserve-Tenant and X-Lmserve-Priority headers). Turn on only when every client is trusted."""
    tensor_parallel_size: int = 1
    """Devices one model is split across; only 1 is supported (scale out with replicas behind the gateway)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile must be given together")
        if self.drain_seconds < 0:
            raise ValueError(f"drain_seconds must be >= 0, got {self.drain_seconds}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        check_log_level(self.log_level)
        if self.generation_config not in GENERATION_CONFIG_MODES:
            raise ValueError(f"generation_config must be auto or none, got {self.generation_config!r}")
        if self.engine_mode not in ENGINE_MODES:
            raise ValueError(f"engine_mode must be process or thread, got {self.engine_mode!r}")
        if self.tensor_parallel_size != 1:
            raise ValueError(
                "tensor_parallel_size > 1 is not supported: run more replicas behind `lmserve gateway`"
            )


# Names other serving stacks use for the same settings.
ALIASES = {
    "model_name": "model",
    "model_path": "model",
    "max_batch_size": "max_num_seqs",
    "gpu_blocks": "num_blocks",
    "num_gpu_blocks": "num_blocks",
    "kv_cache_memory_bytes": "kv_cache_memory",
    "enable_radix_cache": "enable_prefix_caching",
    "cpu_blocks": "num_cpu_blocks",
    "num_swap_blocks": "num_cpu_blocks",
    "swap_space": "swap_space_bytes",
    "policy": "scheduling_policy",
}

SOURCES = [ServerOptions, ModelConfig, CacheConfig, SchedulerConfig]
ServeSettings = settings_model("ServeSettings", SOURCES, ALIASES)


def split_settings(settings: Any) -> tuple[ServerOptions, EngineConfig]:
    """Server options and engine config from validated flat settings (dataclass checks run here)."""
    values = settings.model_dump()
    server = ServerOptions(**{f.name: values[f.name] for f in fields(ServerOptions)})
    engine = EngineConfig(
        model=ModelConfig(**{f.name: values[f.name] for f in fields(ModelConfig)}),
        cache=CacheConfig(**{f.name: values[f.name] for f in fields(CacheConfig)}),
        scheduler=SchedulerConfig(**{f.name: values[f.name] for f in fields(SchedulerConfig)}),
    )
    return server, engine
