"""Attention over the paged KV cache: one interface, one backend per file."""

from lmserve.engine.attention.base import Attention, AttentionBackend, ForwardContext, SequenceSlice

__all__ = ["Attention", "AttentionBackend", "ForwardContext", "SequenceSlice"]
