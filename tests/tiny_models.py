"""Tiny random models of every supported family, saved as Hugging Face directories.

Weights come from a fixed seed and are scaled so that next-token distributions are peaked enough
for greedy decoding to be stable under floating-point reordering. The tokenizer is a byte-level
BPE trained here on a few sentences; nothing touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning was the word, and the word was with the model.",
    "Serving language models means batching many requests at once.",
    "Héllo wörld, naïve café — ünïcödé text with emoji 🙂 and 漢字.",
    "Paged attention keeps keys and values in fixed-size blocks.",
] * 20


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def family_config(family: str, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1,
    )
    if family == "llama2":
        cfg = tf.LlamaConfig(**{**common, "num_key_value_heads": 4})
    elif family == "llama3":
        cfg = tf.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128, "rope_theta": 500000.0,
        })
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=48)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=24)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                            bos_token_id=0, eos_token_id=1)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_model(family: str, path: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Saves a random model of `family` (and the tiny tokenizer) to `path`; returns the HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides), attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.15)
    model.eval()
    model.save_pretrained(str(path))
    build_tokenizer(path)
    return model


FAMILIES = ["llama2", "llama3", "mistral", "qwen2", "qwen3", "gpt2"]
