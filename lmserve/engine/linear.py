"""Linear layers with weights prepacked for oneDNN, for CPUs.

PyTorch's plain `F.linear` on a CPU re-reads the weight in its stored layout for every call;
oneDNN's prepacked layout (what `torch.compile` uses after freezing) runs the model's matrix
multiplies about 1.3-1.8x faster here, and the 32k-wide output head more than twice as fast for
single sequences. Models stay plain `nn.Module`s: the loader swaps their layers after loading.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (read-only: weights are loaded first)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), None)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        # oneDNN packs bfloat16 weights only on CPUs with AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an
        # AVX2-only CPU (an AMD EPYC of this machine's kind) gets the PyTorch path instead.
        and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def pack_linears(model: nn.Module) -> int:
    """Replaces every `nn.Linear` of the model by a `PackedLinear`; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


def choose_linear_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """torch or onednn; raises ValueError when onednn is asked for and cannot run here."""
    if name == "torch":
        return "torch"
    available = onednn_available(device, dtype)
    if name == "onednn" and not available:
        raise ValueError(f"linear_backend onednn needs a CPU, float32 (or bfloat16 on a CPU with AVX-512 BF16 support), and PyTorch with oneDNN ({device}, {dtype})")
    return "onednn" if available else "torch"
