"""Mistral: the Llama decoder with an optional sliding attention window (`sliding_window`)."""

from __future__ import annotations

from lmserve.engine.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Same weights and blocks as Llama; `DecoderSpec` reads `sliding_window` for every layer."""
