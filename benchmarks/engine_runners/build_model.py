"""Builds bench-llama-55m: the random Llama model and token-level tokenizer the engine benchmark runs.

Runs in the `hf` benchmark venv: `python build_model.py OUT_DIR`. The weights come from
`torch.manual_seed(0)` with the config of issue 2, saved as float32 safetensors. The tokenizer is a
word-level vocabulary of 32000 made-up tokens ("<unk>", "<s>", "</s>", then "t3" ... "t31999"): the
benchmark feeds token ids, so it exists only for engines that load a tokenizer from the model
directory and detokenize their outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 32000


def bench_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, VOCAB_SIZE)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(bench_llama_config()).to(torch.float32).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer().save_pretrained(out_dir)
    num_params = sum(p.numel() for p in model.parameters())
    (out_dir / "bench_model.json").write_text(
        json.dumps({"name": "bench-llama-55m", "num_params": num_params})
    )
    print(f"built bench-llama-55m ({num_params / 1e6:.1f}M parameters) in {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
