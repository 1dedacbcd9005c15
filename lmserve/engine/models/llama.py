"""Llama 2 / 3 (and the decoder the Mistral and Qwen files specialise): pre-norm blocks of
grouped-query attention with rotary positions and a gated SiLU MLP."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lmserve.engine.attention import Attention, ForwardContext
from lmserve.engine.models.layers import FusedLinear, RMSNorm, RotaryEmbedding, activation
from lmserve.engine.models.weights import load_checkpoint_weights


@dataclass
class DecoderSpec:
    """What a Llama-family checkpoint's config.json says about its shape."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_windows: list[int | None]
    """Per layer: attend only to this many most recent positions, or None for all."""

    @classmethod
    def from_config(
        cls, config: dict[str, Any], qkv_bias: bool | None = None, qk_norm: bool = False
    ) -> DecoderSpec:
        """`qkv_bias` overrides the config's `attention_bias` for the q/k/v projections only."""
        num_heads = config["num_attention_heads"]
        num_layers = config["num_hidden_layers"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            hidden_act=config.get("hidden_act", "silu"),
            qkv_bias=config.get("attention_bias", False) if qkv_bias is None else qkv_bias,
            o_proj_bias=config.get("attention_bias", False),
            mlp_bias=config.get("mlp_bias", False),
            qk_norm=qk_norm,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            sliding_windows=sliding_windows(config, num_layers),
        )


def sliding_windows(config: dict[str, Any], num_layers: int) -> list[int | None]:
    """Per-layer attention windows from `layer_types` or a model-wide `sliding_window`."""
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    use = config.get("use_sliding_window")
    if use is False or window is None:
        return [None] * num_layers
    if use is True:  # Qwen2-style: only the layers from max_window_layers on are windowed
        first = config.get("max_window_layers", 0)
        return [window if i >= first else None for i in range(num_layers)]
    return [window] * num_layers


class DecoderAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int, max_positions: int, config: dict[str, Any]) -> None:
        super().__init__()
        h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = h * d, hkv * d
        self.qkv_proj = FusedLinear(spec.hidden_size, [h * d, hkv * d, hkv * d], bias=spec.qkv_bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=spec.o_proj_bias)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = RotaryEmbedding(d, max_positions, config)
        self.attn = Attention(layer_idx, h, hkv, d, d**-0.5, spec.sliding_windows[layer_idx])

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The attention output projected, for `rows` only where given (every row's keys and
        values still go to the cache)."""
        num_tokens = hidden.shape[0]
        d = self.attn.head_dim
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(num_tokens, -1, d)).reshape(num_tokens, -1)
            k = self.k_norm(k.reshape(num_tokens, -1, d)).reshape(num_tokens, -1)
        q, k = self.rotary(positions, q, k, d)
        out = self.attn(q, k, v, ctx)
        return self.o_proj(out if rows is None else out[rows])


class GatedMLP(nn.Module):
    native_kernels: ModuleType | None = None

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.gate_up_proj = FusedLinear(spec.hidden_size, [spec.intermediate_size] * 2, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = activation(spec.hidden_act)
        self.is_silu = spec.hidden_act in ("silu", "swish")
        self.intermediate_size = spec.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.native_kernels is not None and self.is_silu:
            return self.down_proj(self.native_kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_idx: int, max_positions: int, config: dict[str, Any]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = DecoderAttention(spec, layer_idx, max_positions, config)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        ctx: ForwardContext,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output before its residual add, the residual stream so far), of `rows`
        only where given: the next norm adds them, in one pass where a kernel can."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(hidden, positions, ctx, rows)
        if rows is not None:
            residual = residual[rows]
        hidden, residual = self.post_attention_layernorm.add_norm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, max_positions: int, config: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, max_positions, config) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, positions, ctx, ctx.output_rows if i == last else None)
        if residual is None:  # no layers
            return self.norm(hidden if ctx.output_rows is None else hidden[ctx.output_rows])
        return self.norm.add_norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama 2 and 3 (rope_scaling linear or llama3), optional attention/MLP bias and head_dim."""

    # Checkpoint projection name -> (fused module, shard index).
    FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: dict[str, Any], max_positions: int) -> None:
        super().__init__()
        self.spec = self.make_spec(config)
        self.model = DecoderModel(self.spec, max_positions, config)
        self.lm_head = nn.Linear(self.spec.hidden_size, self.spec.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Shares the embedding with the output head where the checkpoint does (again after moves)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def make_spec(cls, config: dict[str, Any]) -> DecoderSpec:
        return DecoderSpec.from_config(config)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.spec.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> tuple[str, int | None] | None:
            if "rotary_emb.inv_freq" in name:
                return None
            if self.spec.tie_word_embeddings and name == "lm_head.weight":
                return None
            for part, (fused, shard) in self.FUSED.items():
                if f".{part}." in name:
                    return name.replace(f".{part}.", f".{fused}."), shard
            return name, None

        load_checkpoint_weights(self, weights, rename)
