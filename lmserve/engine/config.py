"""Engine configuration: one dataclass per concern, validated with errors a user can act on."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class PreemptionMode(str, enum.Enum):
    RECOMPUTE = "recompute"
    """Blocks freed (full ones stay in the prefix cache); the history is computed again on resume."""
    SWAP = "swap"
    """Blocks copied to the CPU pool, and back on resume."""


DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "cpu")
LINEAR_BACKENDS = ("auto", "torch", "onednn")
QUANTIZATIONS = ("auto", "none", "int8", "int4", "gptq", "awq")
QUANTIZATION_GROUP_SIZES = (32, 64, 128)
PREEMPTION_MODES = tuple(mode.value for mode in PreemptionMode)
SCHEDULING_POLICIES = ("fcfs", "priority", "fair", "deadline")
DEFAULT_SWAP_SPACE_BYTES = 4 * 2**30


@dataclass
class ModelConfig:
    """Which model to run and how to load it."""

    model: str
    """A local Hugging Face model directory, a Hub id, or `demo` for the built-in demo model."""
    dtype: str = "auto"
    """Weights and activations: auto (float32 on CPU, the checkpoint's dtype on GPU), float32, bfloat16, float16."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; default: the model's max_position_embeddings."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub id; default: the model's."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when the model is downloaded."""
    seed: int = 0
    """Seed of the random generator used by requests without a seed of their own."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    attention_backend: str = "auto"
    """torch (PyTorch ops, runs everywhere), cpu (C++ kernels built at install time or else at the first start: paged decode attention and fused norm, rotary and activation steps), or auto (cpu on CPUs when they build)."""
    linear_backend: str = "auto"
    """torch, onednn (weights prepacked for oneDNN: faster matrix multiplies on CPUs), or auto (onednn where it runs)."""
    quantization: str = "auto"
    """Weight-only quantization of the decoder's linear layers (embeddings and output head stay in dtype):
    int8 (per output channel) or int4 (per group of quantization_group_size input columns), rounded at
    load from a float checkpoint; gptq or awq to load such a 4-bit checkpoint (quantization_config in
    config.json); none (a GPTQ/AWQ checkpoint then runs dequantized); auto: the checkpoint's own (gptq or
    awq where config.json says so, else none)."""
    quantization_group_size: int = 128
    """Input columns that share one int4 scale and zero point when quantizing at load: 32, 64 or 128."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}")
        if self.quantization_group_size not in QUANTIZATION_GROUP_SIZES:
            raise ValueError(f"quantization_group_size must be one of "
                             f"{', '.join(map(str, QUANTIZATION_GROUP_SIZES))}; got {self.quantization_group_size}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}; got {self.linear_backend!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {self.attention_backend!r}"
            )
        if not self.model:
            raise ValueError("model must name a model directory or Hub id")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """Blocks in the KV pool; default: as many as `kv_cache_memory` holds."""
    kv_cache_memory: int | None = None
    """Bytes for the KV pool; default 2 GiB on CPU, 90% of free GPU memory after weights on GPU."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks shared by prompts (chained block hashes, LRU eviction)."""
    share_prefix_cache_across_tenants: bool = False
    """Let a request reuse prefixes cached by another tenant's requests. Off: block hashes are salted
    with the tenant, so cached_tokens and time to first token never reveal what another tenant sent."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")


@dataclass
class SchedulerConfig:
    """How requests share each engine step."""

    max_num_seqs: int = 256
    """Most sequences running at once."""
    max_num_batched_tokens: int = 4096
    """Token budget of one step: decode tokens first, then (chunked) prefill."""
    enable_chunked_prefill: bool = True
    """Split prompts longer than what is left of the budget across steps."""
    preemption_mode: str = "recompute"
    """What happens to a sequence evicted for lack of blocks: recompute (free its blocks) or swap
    (copy them to a CPU pool of `swap_space_bytes`; recompute when that pool is full)."""
    swap_space_bytes: int = DEFAULT_SWAP_SPACE_BYTES
    """Bytes of the CPU pool that swapped-out KV blocks go to; allocated only when preemption_mode is swap."""
    num_cpu_blocks: int | None = None
    """Blocks in that CPU pool, instead of sizing it from swap_space_bytes."""
    scheduling_policy: str = "fcfs"
    """Order in which waiting requests start: fcfs (arrival), priority (lower value first, may preempt
    lower-priority work), fair (tenants share by tokens served), deadline (earliest deadline first)."""
    tenant_weights: dict[str, float] = field(default_factory=dict)
    """Under the fair policy, a tenant's share relative to others (default 1.0 each)."""
    max_queued_requests: int | None = None
    """Requests that may wait to start; beyond it `add_request` raises EngineOverloaded. None: no limit."""
    max_queued_tokens: int | None = None
    """Prompt tokens of requests waiting to start; beyond it `add_request` raises EngineOverloaded."""
    queue_timeout: float | None = None
    """Seconds a request may wait to start before it ends with finish reason timeout, unless the
    request sets its own. None: wait forever."""
    max_tenant_labels: int = 16
    """Tenants that get their own entry in the stats; later ones are counted under "other"."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}; got {self.preemption_mode!r}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; "
                f"got {self.scheduling_policy!r}"
            )
        if self.num_cpu_blocks is not None and self.num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be >= 0, got {self.num_cpu_blocks}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must be >= 0, got {self.swap_space_bytes}")
        for tenant, weight in self.tenant_weights.items():
            if not weight > 0:
                raise ValueError(f"tenant_weights[{tenant!r}] must be > 0, got {weight}")
        for name in ("max_queued_requests", "max_queued_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for no limit), got {value}")
        if self.queue_timeout is not None and not self.queue_timeout > 0:
            raise ValueError(f"queue_timeout must be > 0 seconds (or None), got {self.queue_timeout}")
        if self.max_tenant_labels < 0:
            raise ValueError(f"max_tenant_labels must be >= 0, got {self.max_tenant_labels}")


@dataclass
class EngineConfig:
    """Everything an `Engine` needs, grouped by concern."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Builds a config from flat keyword arguments (`model=..., block_size=..., max_num_seqs=...`).

        Each name belongs to exactly one concern; an unknown name raises `ValueError`.
        """
        groups: dict[type, dict[str, Any]] = {ModelConfig: {}, CacheConfig: {}, SchedulerConfig: {}}
        owners = {f.name: group for group in groups for f in dataclasses.fields(group)}
        for name, value in kwargs.items():
            owner = owners.get(name)
            if owner is None:
                raise ValueError(f"unknown engine setting {name!r}; known: {', '.join(sorted(owners))}")
            groups[owner][name] = value
        return cls(
            model=ModelConfig(**groups[ModelConfig]),
            cache=CacheConfig(**groups[CacheConfig]),
            scheduler=SchedulerConfig(**groups[SchedulerConfig]),
        )
