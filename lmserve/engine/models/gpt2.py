"""GPT-2: learned absolute positions, LayerNorm, fused c_attn projection, tanh-GELU MLP, tied head."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmserve.engine.attention import Attention, ForwardContext
from lmserve.engine.models.layers import activation
from lmserve.engine.models.weights import load_checkpoint_weights

# GPT-2 stores these projections as Conv1D, i.e. transposed relative to nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: dict[str, Any], layer_idx: int) -> None:
        super().__init__()
        hidden, heads = config["n_embd"], config["n_head"]
        head_dim = hidden // heads
        scale = head_dim**-0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.hidden = hidden
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        self.attn = Attention(layer_idx, heads, heads, head_dim, scale)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).split(self.hidden, dim=-1)
        out = self.attn(q, k, v, ctx)
        return self.c_proj(out if rows is None else out[rows])


class GPT2Block(nn.Module):
    def __init__(self, config: dict[str, Any], layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config["n_embd"], config.get("layer_norm_epsilon", 1e-5)
        inner = config.get("n_inner") or 4 * hidden
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(hidden, inner), "c_proj": nn.Linear(inner, hidden)})
        self.act = activation(config.get("activation_function", "gelu_new"))

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output, for `rows` only where given."""
        attended = self.attn(self.ln_1(hidden), ctx, rows)
        hidden = (hidden if rows is None else hidden[rows]) + attended
        mlp = self.mlp["c_proj"](self.act(self.mlp["c_fc"](self.ln_2(hidden))))
        return hidden + mlp


class GPT2Model(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["n_embd"]
        self.wte = nn.Embedding(config["vocab_size"], hidden)
        self.wpe = nn.Embedding(config["n_positions"], hidden)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config["n_layer"]))
        self.ln_f = nn.LayerNorm(hidden, eps=config.get("layer_norm_epsilon", 1e-5))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            hidden = block(hidden, ctx, ctx.output_rows if i == last else None)
        if not self.h and ctx.output_rows is not None:
            hidden = hidden[ctx.output_rows]
        return self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: dict[str, Any], max_positions: int) -> None:
        super().__init__()
        if config.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 with reorder_and_upcast_attn is not supported")
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config["n_embd"], config["vocab_size"], bias=False)
        self.tie_weights()
        self.num_layers = config["n_layer"]
        self.num_kv_heads = config["n_head"]
        self.head_dim = config["n_embd"] // config["n_head"]
        self.vocab_size = config["vocab_size"]

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.transformer(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def transposed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                yield name, tensor.t() if name.endswith(_CONV1D) else tensor

        def rename(name: str) -> tuple[str, int | None] | None:
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                return None  # causal-mask buffers of old checkpoints; the head is tied
            return (name if name.startswith("transformer.") else f"transformer.{name}"), None

        load_checkpoint_weights(self, transposed(), rename)
