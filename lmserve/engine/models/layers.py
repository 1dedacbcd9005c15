"""Building blocks shared by the model files: norms, rotary embeddings, fused projections."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementation."""

    native_kernels: ModuleType | None = None
    """The CPU kernels (lmserve.engine.kernels), when the loader hands them over."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self.native_kernels
        if kernels is not None and x.dtype == self.weight.dtype:
            return kernels.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm block's residual step. May reuse the
        storage of both inputs, which the caller must not read afterwards."""
        kernels = self.native_kernels
        if kernels is not None and x.dtype == self.weight.dtype and x.is_contiguous() and residual.is_contiguous():
            kernels.add_rms_norm(x.view(-1, x.shape[-1]), residual.view(-1, x.shape[-1]), self.weight, self.eps)
            return x, residual
        residual = residual + x
        return self(residual), residual


class FusedLinear(nn.Linear):
    """Several projections of the same input in one matmul; checkpoints load them shard by shard.

    Invariant: output columns `[offsets[i], offsets[i] + sizes[i])` belong to shard i.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]

    def load_shard(self, shard: int, name: str, tensor: torch.Tensor) -> None:
        rows = slice(self.shard_offsets[shard], self.shard_offsets[shard] + self.shard_sizes[shard])
        target = self.weight if name == "weight" else self.bias
        if target is None or target[rows].shape != tensor.shape:
            raise ValueError(
                f"shard {shard} {name}: expected shape {None if target is None else tuple(target[rows].shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        with torch.no_grad():
            target[rows].copy_(tensor)


def rope_inv_freq(head_dim: int, config: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of rotary embeddings and the attention scaling they imply.

    Reads both the classic keys (`rope_theta`, `rope_scaling`) and `rope_parameters`.
    """
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    dim = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend between."""
    factor = float(params["factor"])
    low = float(params["low_freq_factor"])
    high = float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates query/key halves by position-dependent angles (the non-interleaved convention)."""

    native_kernels: ModuleType | None = None
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, config: dict[str, Any]) -> None:
        super().__init__()
        self.inv_freq, self.scaling = rope_inv_freq(head_dim, config)
        self.rotary_dim = self.inv_freq.numel() * 2
        self.max_positions = max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)computes the float32 cos/sin tables on the module's device."""
        device = self.cos.device
        if device.type == "meta":
            return
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        angles = positions[:, None] * self.inv_freq.to(device)[None, :]
        self.cos = angles.cos() * self.scaling
        self.sin = angles.sin() * self.scaling

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; query [T, H * D]; key [T, Hkv * D] -> rotated (in place where a kernel can)."""
        kernels = self.native_kernels
        if kernels is not None and query.stride(-1) == 1 and key.stride(-1) == 1:
            kernels.rotary_embedding(positions, query, key, self.cos, self.sin, head_dim, self.rotary_dim)
            return query, key
        num_tokens = query.shape[0]
        cos = self.cos[positions].unsqueeze(1).to(query.dtype)
        sin = self.sin[positions].unsqueeze(1).to(query.dtype)
        query = self._rotate(query.reshape(num_tokens, -1, head_dim), cos, sin)
        key = self._rotate(key.reshape(num_tokens, -1, head_dim), cos, sin)
        return query.reshape(num_tokens, -1), key.reshape(num_tokens, -1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = x[..., : self.rotary_dim]
        half = self.rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if self.rotary_dim == x.shape[-1]:
            return rotated
        return torch.cat((rotated, x[..., self.rotary_dim :]), dim=-1)


def activation(name: str):
    """The MLP activation named in a Hugging Face config."""
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"activation {name!r} is not supported")
