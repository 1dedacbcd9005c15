"""Qwen3: the Llama decoder with RMSNorm on each query and key head before rotary positions."""

from __future__ import annotations

from typing import Any

from lmserve.engine.models.llama import DecoderSpec, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_spec(cls, config: dict[str, Any]) -> DecoderSpec:
        return DecoderSpec.from_config(config, qk_norm=True)
