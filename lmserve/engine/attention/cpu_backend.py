"""Paged attention for CPUs: decode slices run in a small C++ kernel that reads keys and values
straight from their blocks (no gathered copy, no padding); prefill is PyTorch's (flash) SDPA.

Cache layout per layer: `[2, num_kv_heads, num_blocks, block_size * head_dim]`, key blocks stored
transposed (see csrc/paged_attention_cpu.cpp). Only the block axis matters to code outside the
backend (swapping copies whole blocks), and it is where the PyTorch backend has it.

The kernel is compiled on first use with the machine's C++ compiler and cached by PyTorch
(`~/.cache/torch_extensions`), so later starts load it in about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from lmserve.engine.attention.base import Attention
from lmserve.engine.attention.torch_backend import TorchAttentionBackend, TorchAttentionMetadata

logger = logging.getLogger("lmserve.engine")
SOURCE = Path(__file__).with_name("csrc") / "paged_attention_cpu.cpp"


class KernelBuildError(RuntimeError):
    """The native kernel could not be compiled or loaded here."""


@cache
def load_kernels() -> ModuleType:
    """Compiles (once per machine) and loads the C++ kernels; raises KernelBuildError."""
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    try:
        return load(
            name="lmserve_paged_attention_cpu",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
            verbose=False,
        )
    except Exception as exc:  # compiler missing, headers missing, unsupported flags...
        reason = " ".join(str(exc).split())[:300]
        raise KernelBuildError(f"cannot build the CPU attention kernel: {reason}") from None


def _ninja_on_path() -> None:
    """PyTorch builds with the `ninja` program; the `ninja` package ships one, which is not on PATH
    when python is run from a virtual environment without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # load() then reports that ninja is missing
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


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
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

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
