"""Model architectures, one file each, looked up by the `architectures` entry of config.json."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from lmserve.engine.attention import ForwardContext

# config.json architecture -> (module, class)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
}


class CausalLM(Protocol):
    """What the runner needs of a model; models know nothing of requests or the cache layout."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The final hidden states of `ctx.output_rows` (every row when None), normalized."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def tie_weights(self) -> None: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def model_class(config: dict[str, Any]) -> type:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            module_name, class_name = ARCHITECTURES[name]
            module = importlib.import_module(f"lmserve.engine.models.{module_name}")
            return getattr(module, class_name)
    raise ValueError(
        f"unsupported model architecture {names or config.get('model_type')!r}; "
        f"supported: {', '.join(ARCHITECTURES)}"
    )
