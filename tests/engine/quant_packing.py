"""GPTQ and AWQ checkpoints written here, tensor by tensor, the way AutoGPTQ and AutoAWQ pack them.

Deliberately independent of lmserve's unpacking code: explicit loops over uint32 words, following
AutoGPTQ's `QuantLinear.pack` (qweight packs 8 input rows per word, lowest bits first; qzeros packs 8
output columns per word and stores each zero point minus one in the original format) and AutoAWQ's
`WQLinear_GEMM.from_linear` (8 output columns per word in the order 0, 2, 4, 6, 1, 3, 5, 7).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LayerInts:
    """A layer's 4-bit integers: W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]."""

    q: np.ndarray  # [N, K] in [0, 15]
    zeros: np.ndarray  # [N, G] in [1, 15]
    scales: torch.Tensor  # [N, G] float16, as both formats store them
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The reference dequantization, in float32."""
        groups = np.arange(self.q.shape[1]) // self.group_size
        q = torch.from_numpy(self.q.astype(np.float32))
        zeros = torch.from_numpy(self.zeros[:, groups].astype(np.float32))
        return (q - zeros) * self.scales.float()[:, groups]


def round_to_int4(weight: torch.Tensor, group_size: int) -> LayerInts:
    """Asymmetric round-to-nearest of a float weight [N, K] (zero points kept in 1..15)."""
    w = weight.detach().float().numpy()
    n, k = w.shape
    grouped = w.reshape(n, k // group_size, group_size)
    low, high = np.minimum(grouped.min(axis=2), 0), np.maximum(grouped.max(axis=2), 0)
    scales = torch.from_numpy((high - low) / 15).half()
    s = scales.float().numpy()
    zeros = np.clip(np.round(-low / s), 1, 15).astype(np.int64)
    q = np.clip(np.round(grouped / s[..., None]) + zeros[..., None], 0, 15).astype(np.int64)
    return LayerInts(q.reshape(n, k), zeros, scales, group_size)


def pack_gptq(ints: LayerInts, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """qweight [K / 8, N], qzeros [G, N / 8] (int32), scales [G, N] (float16), g_idx [K] (int32)."""
    intweight = ints.q.T.astype(np.uint32)  # [K, N]
    k, n = intweight.shape
    qweight = np.zeros((k // 8, n), dtype=np.uint32)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= intweight[row * 8 + j] << np.uint32(4 * j)
    stored_zeros = (ints.zeros.T - zero_offset).astype(np.uint32)  # [G, N]
    qzeros = np.zeros((stored_zeros.shape[0], n // 8), dtype=np.uint32)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= stored_zeros[:, col * 8 + j] << np.uint32(4 * j)
    return {"qweight": torch.from_numpy(qweight.view(np.int32)), "qzeros": torch.from_numpy(qzeros.view(np.int32)),
            "scales": ints.scales.T.contiguous(),
            "g_idx": torch.arange(k, dtype=torch.int32) // ints.group_size}


def pack_awq(ints: LayerInts) -> dict[str, torch.Tensor]:
    """qweight [K, N / 8], qzeros [G, N / 8] (int32), scales [G, N] (float16)."""
    def pack_columns(values: np.ndarray) -> np.ndarray:
        rows, n = values.shape
        packed = np.zeros((rows, n // 8), dtype=np.uint32)
        for col in range(n // 8):
            for i, column in enumerate(AWQ_PACK_ORDER):
                packed[:, col] |= values[:, col * 8 + column] << np.uint32(4 * i)
        return packed

    return {"qweight": torch.from_numpy(pack_columns(ints.q.T.astype(np.uint32)).view(np.int32)),
            "qzeros": torch.from_numpy(pack_columns(ints.zeros.T.astype(np.uint32)).view(np.int32)),
            "scales": ints.scales.T.contiguous()}


def write_quantized_checkpoint(hf_model: torch.nn.Module, src: Path, dst: Path, method: str, group_size: int,
                               quantization_config: dict | None = None) -> dict[str, LayerInts]:
    """Copies the float model directory `src` to `dst` with every decoder projection packed in
    `method` (gptq, gptq_v2 or awq); returns each projection's integers by checkpoint name."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, dst / path.name)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerInts] = {}
    for name, tensor in hf_model.state_dict().items():
        prefix, _, kind = name.rpartition(".")
        if kind == "weight" and prefix.rsplit(".", 1)[-1] in PROJECTIONS:
            ints = layers[prefix] = round_to_int4(tensor, group_size)
            packed = pack_awq(ints) if method == "awq" else pack_gptq(ints, 1 if method == "gptq" else 0)
            tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
        else:
            tensors[name] = tensor.detach().clone().contiguous()
    if hf_model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(dst / "model.safetensors"))
    if quantization_config is None:
        if method == "awq":
            quantization_config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                   "version": "gemm"}
        else:
            quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                                   "sym": False, "checkpoint_format": method}
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return layers
