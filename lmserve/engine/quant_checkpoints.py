"""GPTQ and AWQ checkpoints: their `quantization_config` and their packed int4 tensors.

Both formats hold, per quantized linear layer, `qweight` and `qzeros` (int32 words of eight 4-bit
values) and `scales` (one float per group of `group_size` input columns and output column):

- GPTQ (AutoGPTQ, GPTQModel, optimum): `qweight` [in / 8, out] packs 8 consecutive *input* rows
  per word, lowest bits first; `qzeros` [groups, out / 8] packs 8 consecutive output columns the
  same way; `g_idx` [in] names each input column's group. The original format
  (`checkpoint_format` gptq, the default) stores each zero point minus one, which loaders add
  back (so 16 can occur); `gptq_v2` stores them as they are.
- AWQ (AutoAWQ, GEMM version): `qweight` [in, out / 8] and `qzeros` [groups, out / 8] pack 8
  *output* columns per word in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds
  column 8c + order[i]); there is no `g_idx`.

Either way W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g], g = k's group. Reading the stream of
checkpoint tensors, `dequantizing_weights` hands the model the float W of each layer (so names,
fused shards and missing weights are checked as for any checkpoint) and keeps the integers, which
`quantize_model` then puts back behind the layers unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmserve.engine.quantization import Int4Weights

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of an AWQ word holds output column 8c + AWQ_ORDER[i]."""
_AWQ_INVERSE = tuple(AWQ_ORDER.index(j) for j in range(8))
_TENSORS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's quantization_config says, once checked to be loadable here."""

    method: str
    """gptq or awq."""
    group_size: int | None
    """Input columns per scale; None: one group over all of a layer's inputs (GPTQ's -1)."""
    zero_offset: int
    """Added to every stored zero point: 1 for GPTQ's original format, else 0."""


def read_checkpoint_quantization(model_dir: Path, hf_config: dict[str, Any]) -> CheckpointQuantization | None:
    """The checkpoint's quantization (config.json's quantization_config, or AutoGPTQ's older
    quantize_config.json), None for a float checkpoint; ValueError for one that cannot load here."""
    config = hf_config.get("quantization_config")
    if config is None and (model_dir / "quantize_config.json").is_file():
        config = {"quant_method": "gptq", **json.loads((model_dir / "quantize_config.json").read_text())}
    if config is None:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method not in _TENSORS:
        raise ValueError(f"checkpoints quantized with {method or 'an unnamed method'!r} are not supported "
                         "(supported: 4-bit gptq and awq)")
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{method} checkpoints of {bits} bits are not supported (only 4-bit gptq and awq); "
                         "load the float model with --quantization int8 instead")
    group_size = int(config.get("group_size", config.get("q_group_size", 128)))
    if method == "awq":
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm" or config.get("zero_point", True) is not True:
            raise ValueError(f"awq checkpoints of version {version!r} (zero_point "
                             f"{config.get('zero_point', True)}) are not supported (only gemm with zero points)")
        return CheckpointQuantization("awq", group_size, 0)
    checkpoint_format = str(config.get("checkpoint_format", "gptq")).lower()
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq checkpoint_format {checkpoint_format!r} is not supported (gptq or gptq_v2)")
    return CheckpointQuantization("gptq", None if group_size == -1 else group_size,
                                  1 if checkpoint_format == "gptq" else 0)


def dequantizing_weights(weights: Iterable[tuple[str, torch.Tensor]], quant: CheckpointQuantization,
                         found: dict[str, Int4Weights]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each quantized layer's parts replaced by its float `weight`;
    the layer's integers go to `found` under the layer's checkpoint name."""
    kinds = _TENSORS[quant.method]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, kind = name.rpartition(".")
        if kind in kinds:  # a layer's parts may sit in different shards: gather them first
            pending.setdefault(prefix, {})[kind] = tensor
        else:
            yield name, tensor
    for prefix, parts in pending.items():
        missing = [k for k in kinds[:3] if k not in parts]
        if missing:
            raise ValueError(f"quantized layer {prefix} lacks {', '.join(missing)}")
        unpack = unpack_gptq if quant.method == "gptq" else unpack_awq
        try:
            int4 = unpack(parts, quant)
        except ValueError as exc:
            raise ValueError(f"{prefix}: {exc}") from None
        found[prefix] = int4
        yield f"{prefix}.weight", int4.dequantize()


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> uint8 [..., W, 8]: each word's eight 4-bit values, lowest bits first."""
    return ((words.to(torch.int32)[..., None] >> _SHIFTS) & 0xF).to(torch.uint8)


def _check_shapes(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, in_features: int,
                  out_features: int) -> int:
    """The number of groups, after checking the three tensors agree."""
    num_groups = scales.shape[0]
    if scales.dim() != 2 or scales.shape[1] != out_features or num_groups < 1 or in_features % num_groups:
        raise ValueError(f"scales of shape {tuple(scales.shape)} do not fit qweight {tuple(qweight.shape)}")
    if tuple(qzeros.shape) != (num_groups, out_features // 8):
        raise ValueError(f"qzeros of shape {tuple(qzeros.shape)}, expected {(num_groups, out_features // 8)}")
    return num_groups


def unpack_gptq(parts: dict[str, torch.Tensor], quant: CheckpointQuantization) -> Int4Weights:
    """GPTQ's packed tensors as integers; ValueError for act-order (desc_act) checkpoints, whose
    g_idx does not group consecutive columns, which the int4 layout here requires."""
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
    num_groups = _check_shapes(qweight, qzeros, scales, in_features, out_features)
    group_size = in_features // num_groups
    if quant.group_size is not None and quant.group_size != group_size:
        raise ValueError(f"{num_groups} groups of scales, but the config's group_size is {quant.group_size}")
    g_idx = parts.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group_size):
        raise ValueError("g_idx is not in input order: checkpoints quantized with desc_act=true (activation "
                         "order) are not supported; use one quantized with desc_act=false")
    q = _nibbles(qweight).permute(0, 2, 1).reshape(in_features, out_features).t()
    zeros = _nibbles(qzeros).reshape(num_groups, out_features).t() + quant.zero_offset
    return Int4Weights(q.contiguous(), zeros.contiguous(), scales.float().t().contiguous(), group_size)


def unpack_awq(parts: dict[str, torch.Tensor], quant: CheckpointQuantization) -> Int4Weights:
    """AWQ's packed tensors (GEMM layout) as integers."""
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    num_groups = _check_shapes(qweight, qzeros, scales, in_features, out_features)
    group_size = in_features // num_groups
    if quant.group_size is not None and quant.group_size != group_size:
        raise ValueError(f"{num_groups} groups of scales, but the config's group_size is {quant.group_size}")
    inverse = list(_AWQ_INVERSE)
    q = _nibbles(qweight)[..., inverse].reshape(in_features, out_features).t()
    zeros = _nibbles(qzeros)[..., inverse].reshape(num_groups, out_features).t() + quant.zero_offset
    return Int4Weights(q.contiguous(), zeros.contiguous(), scales.float().t().contiguous(), group_size)
