"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q/k/v projections (not on o_proj)."""

from __future__ import annotations

from typing import Any

from lmserve.engine.models.llama import DecoderSpec, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_spec(cls, config: dict[str, Any]) -> DecoderSpec:
        return DecoderSpec.from_config(config, qkv_bias=True)
