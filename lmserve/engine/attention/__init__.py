"""Attention over the paged KV cache: one interface, one backend per file."""

import logging

import torch

from lmserve.engine.attention.base import Attention, AttentionBackend, ForwardContext, SequenceSlice

__all__ = ["Attention", "AttentionBackend", "ForwardContext", "SequenceSlice", "make_backend"]

logger = logging.getLogger("lmserve.engine")


def make_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    """The attention backend called `name` (auto: the fastest that works on `device`)."""
    from lmserve.engine.attention.cpu_backend import CPUAttentionBackend
    from lmserve.engine.attention.torch_backend import TorchAttentionBackend
    from lmserve.engine.kernels import KernelBuildError

    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise ValueError(f"attention_backend cpu needs a CPU device, not {device}")
        try:
            return CPUAttentionBackend(block_size)
        except KernelBuildError as exc:
            if name == "cpu":
                raise ValueError(str(exc)) from None
            logger.warning("%s; using the PyTorch attention backend (slower)", exc)
    return TorchAttentionBackend(block_size)
