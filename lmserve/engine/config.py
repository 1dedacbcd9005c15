"""Engine configuration: one dataclass per concern, validated with errors a user can act on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "cpu")
PREEMPTION_MODES = ("recompute", "swap")


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
    """torch (runs everywhere), cpu (a C++ decode kernel built on first use), or auto (cpu on CPUs when it builds)."""

    def __post_init__(self) -> None:
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
    """What happens to a sequence evicted for lack of blocks: recompute (free its blocks) or swap."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}; got {self.preemption_mode!r}"
            )


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
