"""Weight-only quantization behind the linear layer: int8 per output channel, int4 per group.

A model is built and loaded in float as always; `quantize_model` then swaps the decoder's linear
layers (not the embedding or the output head) for `QuantizedLinear`s. Their integers come either
from rounding the loaded float weights here (`int8`, `int4`) or, for GPTQ/AWQ checkpoints, from
the checkpoint itself (quant_checkpoints.py), so the model files do not change.

Kernel: the layer dequantizes its weight at each call and calls `F.linear`, which is correct on
every device and saves memory, not time. PyTorch's packed int8/int4 CPU kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) were measured 8-60x slower than float32
on an AVX2 CPU (AMD EPYC, torch 2.13), slower still than dequantizing, so they are not used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("lmserve.engine")



@dataclass
class Int8Weights:
    """W[n, k] = q[n, k] * scales[n]; q in [-127, 127] (symmetric: no zero point)."""

    q: torch.Tensor
    """int8 [out_features, in_features]."""
    scales: torch.Tensor
    """float32 [out_features]."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scales[:, None]).to(dtype)


@dataclass
class Int4Weights:
    """W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g] with g = k // group_size.

    Invariant: q in [0, 15]; zero points are integers (GPTQ's older format allows 16); every group
    is `group_size` consecutive input columns.
    """

    q: torch.Tensor
    """uint8 [out_features, in_features], one 4-bit value per element."""
    zeros: torch.Tensor
    """uint8 [out_features, in_features // group_size]: the integer zero points."""
    scales: torch.Tensor
    """float32 [out_features, in_features // group_size]."""
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = torch.arange(self.q.shape[1], device=self.q.device) // self.group_size
        zeros = self.zeros.float()[:, groups]
        return ((self.q.float() - zeros) * self.scales[:, groups]).to(dtype)

    @staticmethod
    def concat(parts: list[Int4Weights]) -> Int4Weights:
        """Shards stacked along the output dimension (a fused projection's layout)."""
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"the shards of one projection have different group sizes {sorted(sizes)}")
        return Int4Weights(torch.cat([p.q for p in parts]), torch.cat([p.zeros for p in parts]),
                           torch.cat([p.scales for p in parts]), parts[0].group_size)


def quantize_int8(weight: torch.Tensor) -> Int8Weights:
    """Symmetric per-output-channel rounding: scale = max |w| / 127 (1 for an all-zero row)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weights(q, scales)


CLIP_RATIOS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8)
"""Shrinks of a group's range tried by `quantize_int4` (as GPTQ's mse option does)."""


def quantize_int4(weight: torch.Tensor, group_size: int) -> Int4Weights:
    """Asymmetric rounding per group of `group_size` input columns: the group's range, widened to
    hold 0 and shrunk by the ratio of `CLIP_RATIOS` that leaves the least squared error, is cut into
    15 steps; the zero point is the integer that 0.0 maps to."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the {in_features} input features "
                         "of a layer; choose a quantization_group_size that does (32, 64 or 128)")
    w = weight.detach().float().reshape(out_features, -1, group_size)
    low, high = w.amin(dim=2).clamp(max=0.0), w.amax(dim=2).clamp(min=0.0)
    def candidate(ratio: float) -> tuple[torch.Tensor, ...]:
        scales, zeros, q = _round_int4(w, low * ratio, high * ratio)
        return scales, zeros, q, ((q - zeros[..., None]) * scales[..., None] - w).square().sum(dim=2)

    best = candidate(CLIP_RATIOS[0])
    for ratio in CLIP_RATIOS[1:]:
        scales, zeros, q, error = candidate(ratio)
        better = error < best[3]
        best = (torch.where(better, scales, best[0]), torch.where(better, zeros, best[1]),
                torch.where(better[..., None], q, best[2]), torch.minimum(error, best[3]))
    scales, zeros, q, _ = best
    return Int4Weights(q.reshape(out_features, in_features).to(torch.uint8), zeros.to(torch.uint8), scales,
                       group_size)


def _round_int4(w: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(scales, zero points, q) of groups `w` [N, G, size] for the ranges [low, high] [N, G]."""
    scales = (high - low) / 15.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-low / scales).clamp(0, 15)
    q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return scales, zeros, q


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of 4-bit values -> uint8 [N, K / 2]: column 2j in the low nibble, 2j + 1 high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=2).reshape(packed.shape[0], -1)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as int8 or int4 integers and float scales.

    int8: `qweight` int8 [out, in], `scales` [out]; int4: `qweight` uint8 [out, in / 2] (two
    columns per byte, `pack_nibbles`), `scales` and integer `zeros` [out, in / group_size].
    Scales are float32; activations keep their dtype.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, weights: Int8Weights | Int4Weights, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.q.shape
        self.bits = 8 if isinstance(weights, Int8Weights) else 4
        self.group_size = weights.group_size if isinstance(weights, Int4Weights) else self.in_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.register_buffer("scales", weights.scales.float().contiguous())
        if isinstance(weights, Int8Weights):
            self.register_buffer("qweight", weights.q.contiguous())
        else:
            self.register_buffer("qweight", pack_nibbles(weights.q).contiguous())
            self.register_buffer("zeros", weights.zeros.to(torch.uint8).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = F.linear(flat, self.dequantize(flat.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [out, in] this layer multiplies by."""
        if self.bits == 8:
            return (self.qweight.float() * self.scales[:, None]).to(dtype)
        groups = torch.arange(self.in_features, device=self.qweight.device) // self.group_size
        q = unpack_nibbles(self.qweight).float()
        return ((q - self.zeros.float()[:, groups]) * self.scales[:, groups]).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


def quantizable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(module name, parent, attribute, layer) of every linear layer but the output head."""
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, nn.Linear) and attr != "lm_head":
                yield name, parent, attr, child


def quantize_model(model: nn.Module, method: str, group_size: int, dtype: torch.dtype,
                   checkpoint_weights: dict[str, Int4Weights] | None = None) -> int:
    """Replaces the model's linear layers by `QuantizedLinear`s; returns how many.

    `method` int8 or int4 rounds the loaded float weights; with `checkpoint_weights` (a GPTQ/AWQ
    checkpoint's integers by checkpoint module name) each layer takes its own shards' integers,
    and a layer the checkpoint left in float stays float.
    """
    count = 0
    for name, parent, attr, linear in list(quantizable_linears(model)):
        weights: Int8Weights | Int4Weights | None
        if checkpoint_weights is not None:
            weights = _checkpoint_int4(model, name, linear, checkpoint_weights)
        elif method == "int8":
            weights = quantize_int8(linear.weight)
        else:
            weights = quantize_int4(linear.weight, group_size)
        if weights is None:
            continue
        if isinstance(weights, Int4Weights) and weights.q.shape != linear.weight.shape:
            raise ValueError(f"{name}: quantized weight of shape {tuple(weights.q.shape)}, the model expects "
                             f"{tuple(linear.weight.shape)}")
        setattr(parent, attr, QuantizedLinear(weights, linear.bias, dtype))
        count += 1
    return count


def checkpoint_parts(model: nn.Module, name: str) -> list[str]:
    """The checkpoint module names a layer of the model is made of, in shard order (q, k, v for a
    fused qkv_proj, per the model class's FUSED map)."""
    parent, _, attr = name.rpartition(".")
    fused: dict[str, tuple[str, int]] = getattr(type(model), "FUSED", {})
    shards = sorted((shard, part) for part, (target, shard) in fused.items() if target == attr)
    return [f"{parent}.{part}" for _, part in shards] or [name]


def _checkpoint_int4(model: nn.Module, name: str, linear: nn.Linear,
                     checkpoint_weights: dict[str, Int4Weights]) -> Int4Weights | None:
    parts = checkpoint_parts(model, name)
    found = [checkpoint_weights[p] for p in parts if p in checkpoint_weights]
    if not found:
        return None  # left in float by the checkpoint (AWQ's modules_to_not_convert, for one)
    if len(found) != len(parts):
        missing = [p for p in parts if p not in checkpoint_weights]
        raise ValueError(f"{name}: the checkpoint quantizes some of its shards but not {', '.join(missing)}")
    return Int4Weights.concat(found)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and quantized weights (each tied tensor once)."""
    seen: set[int] = set()
    total = 0
    tensors: list[torch.Tensor] = list(model.parameters())
    tensors += [b for m in model.modules() if isinstance(m, QuantizedLinear) for b in m.buffers(recurse=False)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def memory_report(method: str, dtype: torch.dtype, num_bytes: int, unquantized_bytes: int, block_bytes: int) -> str:
    """One log line: the weights' bytes, and what quantizing them saved in bytes and KV blocks."""
    dtype_name = str(dtype).removeprefix("torch.")
    line = f"weights: {num_bytes / 2**20:.1f} MiB"
    if method == "none":
        return f"{line} in {dtype_name}"
    saved = unquantized_bytes - num_bytes
    return (f"{line} with {method} quantization ({unquantized_bytes / 2**20:.1f} MiB in {dtype_name}): "
            f"{saved / 2**20:.1f} MiB saved, room for {saved // block_bytes} more KV blocks of "
            f"{block_bytes / 2**10:.0f} KiB")
