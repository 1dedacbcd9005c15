"""Paged attention for CPUs: C++ kernels that read keys and values straight from their blocks (no
gathered copy, no padding, no mask tensor): one for decode slices, one for every prefill slice of
a step (flash attention; chunked prefills included). Shapes the prefill kernel does not handle
(block sizes other than 16, unusual head sizes) use PyTorch's SDPA per slice.

Cache layout per layer: `[2, num_kv_heads, num_blocks, block_size * head_dim]`, key blocks stored
transposed (see ../csrc/paged_attention_cpu.cpp). Only the block axis matters to code outside the
backend (swapping copies whole blocks), and it is where the PyTorch backend has it.

The kernels are built at install time, or else at the first start (lmserve/engine/kernels.py).
"""

from __future__ import annotations

import torch

from lmserve.engine.attention.base import Attention, SequenceSlice
from lmserve.engine.attention.torch_backend import TorchAttentionBackend, TorchAttentionMetadata, block_tables
from lmserve.engine.kernels import load_kernels, zeros_on_huge_pages


class CPUAttentionBackend(TorchAttentionBackend):
    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self.kernels = load_kernels()

    def allocate_cache(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[torch.Tensor]:
        shape = (2, num_kv_heads, num_blocks, block_size * head_dim)
        return [zeros_on_huge_pages(shape, dtype) for _ in range(num_layers)]

    def build_metadata(
        self, slices: list[SequenceSlice], slot_mapping: torch.Tensor, device: torch.device
    ) -> TorchAttentionMetadata:
        metadata = super().build_metadata(slices, slot_mapping, device)
        prefills = metadata.prefills
        if prefills:
            first = prefills[0].query_start
            metadata.prefill_layout = torch.tensor(
                [(s.query_start - first, s.query_len, s.context_len) for s in prefills], dtype=torch.long
            )
            metadata.prefill_block_tables = block_tables(prefills)
        return metadata

    def _prefills(
        self,
        layer: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        output: torch.Tensor,
    ) -> None:
        if (
            metadata.prefill_layout is None
            or metadata.prefill_block_tables is None
            or not self.kernels.prefill_attention_supports(layer.head_dim, self.block_size)
        ):
            super()._prefills(layer, query, key, value, kv_cache, metadata, output)
            return
        nd = metadata.num_decodes
        self.kernels.paged_prefill_attention(
            query[nd:].view(-1, layer.num_heads, layer.head_dim),
            kv_cache,
            metadata.prefill_layout,
            metadata.prefill_block_tables,
            layer.scale,
            layer.sliding_window or 0,
            output[nd:],
        )

    def _write(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        self.kernels.write_kv(key, value, kv_cache, slots)

    def _context(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor, context_len: int, hkv: int, d: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kernels.gather_kv(kv_cache, block_ids, context_len, d)
        return keys, values

    def _decode(
        self, layer: Attention, query: torch.Tensor, kv_cache: torch.Tensor, metadata: TorchAttentionMetadata
    ) -> torch.Tensor:
        if metadata.decode_block_tables is None or metadata.decode_context_lens is None:
            raise RuntimeError("decode attention asked for a step without decode slices")
        batch = query.shape[0]
        out = self.kernels.paged_decode_attention(
            query.view(batch, layer.num_heads, layer.head_dim),
            kv_cache,
            metadata.decode_block_tables,
            metadata.decode_context_lens,
            layer.scale,
            layer.sliding_window or 0,
        )
        return out.view(batch, layer.num_heads * layer.head_dim)
