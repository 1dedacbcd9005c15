"""Hugging Face transformers reference: `generate` in static batches, in arrival order.

Runs in the `hf` benchmark venv. Each batch of `batch_size` requests is left-padded to its longest
prompt and generates the batch's longest output; each request keeps only its own output_len tokens
(the rest is the waste a static batch pays). Greedy; `eos_token_id=None` so nothing stops early and
no logits are masked, which is what `ignore_eos` means for the other engines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from common import TokenIds, run
from transformers import AutoModelForCausalLM, GenerationConfig

PAD_TOKEN_ID = 0


class HFStaticBatchEngine:
    def __init__(self, model_dir: str, config: dict[str, Any]) -> None:
        torch.set_num_threads(config.get("num_threads") or os.cpu_count() or 1)
        self.batch_size: int = config.get("batch_size", 16)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=config.get("attn_implementation", "sdpa")
        ).eval()

    def _generate_batch(self, prompts: Sequence[TokenIds], output_lens: Sequence[int]) -> list[TokenIds]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), PAD_TOKEN_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        max_new_tokens = max(output_lens)
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=PAD_TOKEN_ID,
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config
            )
        new_tokens = out[:, width:]
        if new_tokens.shape[1] != max_new_tokens:
            raise RuntimeError(f"generate stopped at {new_tokens.shape[1]} of {max_new_tokens} tokens")
        return [new_tokens[row, :n].tolist() for row, n in enumerate(output_lens)]

    def generate(self, prompts: Sequence[TokenIds], output_lens: Sequence[int]) -> list[TokenIds]:
        outputs: list[TokenIds] = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            outputs += self._generate_batch(prompts[start:end], output_lens[start:end])
        return outputs


def make_engine(model_dir: str, config: dict[str, Any]) -> tuple[HFStaticBatchEngine, dict[str, Any]]:
    engine = HFStaticBatchEngine(model_dir, config)
    facts = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "num_threads": torch.get_num_threads(),
        "batch_size": engine.batch_size,
        "attn_implementation": engine.model.config._attn_implementation,
    }
    return engine, facts


if __name__ == "__main__":
    run(make_engine)
