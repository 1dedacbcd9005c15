"""The attention interface shared by every model and every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's tokens in a flat batch: queries `[query_start, query_start + query_len)`
    are its tokens at positions `[context_len - query_len, context_len)`."""

    query_start: int
    query_len: int
    context_len: int
    block_ids: list[int]


class AttentionBackend(Protocol):
    """Writes new keys/values into the paged cache and attends over each sequence's context."""

    def build_metadata(
        self, slices: list[SequenceSlice], slot_mapping: torch.Tensor, device: torch.device
    ) -> Any:
        """Everything the backend precomputes once per step (masks, gather indices)."""
        ...

    def allocate_cache(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> list[torch.Tensor]:
        ...

    def copy_blocks(
        self, src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor], pairs: list[tuple[int, int]]
    ) -> None:
        """For each (src, dst) pair, copies block src of every layer's source cache to block dst of
        its destination cache; the caches may be on different devices (swap)."""
        ...

    def forward(
        self,
        layer: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
    ) -> torch.Tensor:
        """query [T, H*D], key/value [T, Hkv*D] -> output [T, H*D]."""
        ...


@dataclass
class ForwardContext:
    """What a model forward pass needs beyond token ids and positions."""

    backend: AttentionBackend
    metadata: Any
    kv_caches: list[torch.Tensor]
    output_rows: torch.Tensor | None = None
    """The rows whose final hidden states are wanted, in the order the model returns them (None:
    every row). The last layer writes every row's keys and values, then carries on with these
    rows only: in a prefill step that is one row per prompt instead of thousands."""


class Attention(nn.Module):
    """The attention of one layer: shapes and options; the backend does the work."""

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        return ctx.backend.forward(self, query, key, value, ctx.kv_caches[self.layer_idx], ctx.metadata)
