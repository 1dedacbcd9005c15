"""Paged attention in plain PyTorch: runs wherever PyTorch runs (CPU, CUDA).

Cache layout per layer: `[2, num_kv_heads, num_blocks, block_size, head_dim]`. Indexing the block
axis with a `[B, blocks]` table yields `[num_kv_heads, B, blocks * block_size, head_dim]`
contiguous, which is exactly the shape batched decode attention multiplies with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmserve.engine.attention.base import Attention, SequenceSlice


def block_tables(slices: list[SequenceSlice], device: torch.device | None = None) -> torch.Tensor:
    """[len(slices), most blocks] int64: each slice's block ids, padded with 0."""
    width = max(len(s.block_ids) for s in slices)
    return torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in slices], dtype=torch.long, device=device)


@dataclass
class TorchAttentionMetadata:
    """Per-step inputs shared by every layer. Decode slices (one query token) come first."""

    slot_mapping: torch.Tensor
    block_size: int
    num_decodes: int
    decode_block_tables: torch.Tensor | None
    decode_context_lens: torch.Tensor | None
    prefills: list[SequenceSlice]
    prefill_layout: torch.Tensor | None = None
    """Backends that attend every prefill slice in one call: [P, 3] (first row after the decodes,
    rows, context length) per slice."""
    prefill_block_tables: torch.Tensor | None = None
    """[P, width], each slice's block ids padded with 0."""
    _made: dict[tuple, torch.Tensor] = field(default_factory=dict)
    """Masks and block-id tensors made on first use, shared by every layer of the step."""

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask `[B, 1, L]`: 0 where a decode query may attend, -inf elsewhere."""
        key = ("decode", window, dtype)
        mask = self._made.get(key)
        if mask is None:
            if self.decode_block_tables is None or self.decode_context_lens is None:
                raise RuntimeError("decode mask asked for a step without decode slices")
            max_len = self.decode_block_tables.shape[1] * self.block_size
            positions = torch.arange(max_len, device=self.slot_mapping.device)
            lens = self.decode_context_lens[:, None]
            allowed = positions[None, :] < lens
            if window is not None:
                allowed &= positions[None, :] >= lens - window
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            mask.masked_fill_(~allowed, float("-inf"))
            mask = mask[:, None, :]
            self._made[key] = mask
        return mask

    def prefill_block_ids(self, i: int) -> torch.Tensor:
        """Block ids of prefill slice i as a tensor, made when a layer first asks (backends with a
        kernel for all prefills never do)."""
        key = ("blocks", i)
        ids = self._made.get(key)
        if ids is None:
            ids = torch.tensor(self.prefills[i].block_ids, dtype=torch.long, device=self.slot_mapping.device)
            self._made[key] = ids
        return ids

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        """Boolean mask `[q, context]` for prefill slice i; None when plain causal attention applies."""
        s = self.prefills[i]
        start = s.context_len - s.query_len
        if start == 0 and (window is None or window >= s.context_len):
            return None
        key = ("prefill", i, window)
        mask = self._made.get(key)
        if mask is None:
            device = self.slot_mapping.device
            q_pos = torch.arange(start, s.context_len, device=device)[:, None]
            k_pos = torch.arange(s.context_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._made[key] = mask
        return mask


class TorchAttentionBackend:
    """Decode slices are attended in one batched matmul over their gathered, padded contexts;
    prefill slices one by one with `scaled_dot_product_attention`."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

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
        shape = (2, num_kv_heads, num_blocks, block_size, head_dim)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def copy_blocks(
        self, src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor], pairs: list[tuple[int, int]]
    ) -> None:
        if not pairs:
            return
        src_ids = torch.tensor([src for src, _ in pairs], dtype=torch.long, device=src_caches[0].device)
        dst_ids = torch.tensor([dst for _, dst in pairs], dtype=torch.long, device=dst_caches[0].device)
        for src, dst in zip(src_caches, dst_caches):
            # Block axis 2 of [2, num_kv_heads, num_blocks, block_size, head_dim].
            dst.index_copy_(2, dst_ids, src.index_select(2, src_ids).to(dst.device))

    def build_metadata(
        self, slices: list[SequenceSlice], slot_mapping: torch.Tensor, device: torch.device
    ) -> TorchAttentionMetadata:
        decodes = [s for s in slices if s.query_len == 1]
        prefills = slices[len(decodes) :]
        if any(s.query_len == 1 for s in prefills):
            raise ValueError("decode slices (one query token) must come first")
        tables = lens = None
        if decodes:
            tables = block_tables(decodes, device)
            lens = torch.tensor([s.context_len for s in decodes], dtype=torch.long, device=device)
        return TorchAttentionMetadata(
            slot_mapping=slot_mapping,
            block_size=self.block_size,
            num_decodes=len(decodes),
            decode_block_tables=tables,
            decode_context_lens=lens,
            prefills=prefills,
        )

    def forward(
        self,
        layer: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = query.shape[0]
        h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        key = key.view(num_tokens, hkv, d)
        value = value.view(num_tokens, hkv, d)
        self._write(kv_cache, key, value, metadata.slot_mapping)
        output = torch.empty(num_tokens, h * d, dtype=query.dtype, device=query.device)
        nd = metadata.num_decodes
        if nd:
            output[:nd] = self._decode(layer, query[:nd], kv_cache, metadata)
        if metadata.prefills:
            self._prefills(layer, query, key, value, kv_cache, metadata, output)
        return output

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
        """Fills the prefill rows of `output` (after the decodes), one slice at a time."""
        for i, s in enumerate(metadata.prefills):
            rows = slice(s.query_start, s.query_start + s.query_len)
            output[rows] = self._prefill(layer, i, query[rows], key[rows], value[rows], kv_cache, metadata)

    def _write(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Stores each token's key and value [T, Hkv, D] in its cache slot."""
        hkv, d = key.shape[1], key.shape[2]
        flat = kv_cache.view(2, hkv, -1, d)
        flat[0].index_copy_(1, slots, key.transpose(0, 1))
        flat[1].index_copy_(1, slots, value.transpose(0, 1))

    def _decode(
        self, layer: Attention, query: torch.Tensor, kv_cache: torch.Tensor, metadata: TorchAttentionMetadata
    ) -> torch.Tensor:
        tables = metadata.decode_block_tables
        if tables is None:
            raise RuntimeError("decode attention asked for a step without decode slices")
        batch = query.shape[0]
        h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        keys = kv_cache[0][:, tables].view(hkv, batch, -1, d)
        values = kv_cache[1][:, tables].view(hkv, batch, -1, d)
        q = query.view(batch, hkv, h // hkv, d).transpose(0, 1)
        scores = torch.matmul(q, keys.transpose(-1, -2))
        scores.mul_(layer.scale).add_(metadata.decode_mask(layer.sliding_window, scores.dtype))
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, values).transpose(0, 1).reshape(batch, h * d)

    def _prefill(
        self,
        layer: Attention,
        i: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
    ) -> torch.Tensor:
        s = metadata.prefills[i]
        h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        q = query.view(s.query_len, h, d).transpose(0, 1)
        if s.context_len == s.query_len:
            keys, values = key.transpose(0, 1), value.transpose(0, 1)
        else:
            keys, values = self._context(kv_cache, metadata.prefill_block_ids(i), s.context_len, hkv, d)
        mask = metadata.prefill_mask(i, layer.sliding_window)
        out = F.scaled_dot_product_attention(
            q[None], keys[None], values[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=layer.scale,
            enable_gqa=h != hkv,
        )
        return out[0].transpose(0, 1).reshape(s.query_len, h * d)

    def _context(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor, context_len: int, hkv: int, d: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `context_len` keys and values of one sequence, each [Hkv, context_len, D]."""
        keys = kv_cache[0][:, block_ids].view(hkv, -1, d)[:, :context_len]
        values = kv_cache[1][:, block_ids].view(hkv, -1, d)[:, :context_len]
        return keys, values
