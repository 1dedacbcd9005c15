"""Every architecture against Hugging Face transformers on the same random weights (float32)."""

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.engine.attention import ForwardContext, SequenceSlice, make_backend
from lmserve.engine.config import ModelConfig
from lmserve.engine.loader import load_model
from tests.tiny_models import FAMILIES

BLOCK_SIZE = 8
PROMPT_LENGTHS = [1, 3, 7, 8, 17, 33, 64, 100]


def prompts(vocab: int):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


class PagedModel:
    """Our model with a KV cache, fed slices by hand (what the runner does for real)."""

    def __init__(self, path, backend: str, num_blocks=64):
        self.loaded = load_model(ModelConfig(model=str(path), dtype="float32"))
        model = self.loaded.model
        self.backend = make_backend(backend, torch.device("cpu"), BLOCK_SIZE)
        self.caches = self.backend.allocate_cache(
            model.num_layers, num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim, torch.float32, torch.device("cpu")
        )

    @torch.inference_mode()
    def logits(self, token_ids, start, block_ids, output_rows=None):
        n = len(token_ids)
        positions = torch.arange(start, start + n)
        slots = torch.tensor([block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions.tolist()])
        meta = self.backend.build_metadata([SequenceSlice(0, n, start + n, block_ids)], slots, torch.device("cpu"))
        rows = None if output_rows is None else torch.tensor(output_rows, dtype=torch.long)
        ctx = ForwardContext(self.backend, meta, self.caches, output_rows=rows)
        hidden = self.loaded.model(torch.tensor(token_ids), positions, ctx)
        return self.loaded.model.compute_logits(hidden)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logits_match_transformers(tiny_model_factory, family, backend):
    path, hf = tiny_model_factory(family)
    ids = prompts(hf.config.vocab_size)[-1]  # 100 tokens: past Mistral's 48-token window
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    paged = PagedModel(path, backend)
    block_ids = list(range(20, 20 + -(-len(ids) // BLOCK_SIZE)))[::-1]  # scattered, descending blocks
    torch.testing.assert_close(paged.logits(ids, 0, block_ids), expected, rtol=1e-4, atol=1e-4)

    # The same prompt fed in chunks of 13 and then token by token reads earlier keys from the cache.
    got = [paged.logits(ids[i : i + 13], i, block_ids) for i in range(0, 52, 13)]
    got += [paged.logits([ids[i]], i, block_ids) for i in range(52, len(ids))]
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_rows_are_the_rows_of_a_full_forward(tiny_model_factory, family):
    # The last layer carries on past attention with the asked rows only (in the asked order).
    path, hf = tiny_model_factory(family)
    ids = prompts(hf.config.vocab_size)[-1]
    paged = PagedModel(path, "cpu")
    block_ids = list(range(20, 20 + -(-len(ids) // BLOCK_SIZE)))[::-1]
    full = paged.logits(ids, 0, block_ids)
    rows = [99, 0, 41]
    torch.testing.assert_close(paged.logits(ids, 0, block_ids, output_rows=rows), full[rows], rtol=1e-5, atol=1e-5)
    # A chunk that samples nothing still writes every layer's keys and values for the next one.
    assert paged.logits(ids[:60], 0, block_ids, output_rows=[]).shape[0] == 0
    torch.testing.assert_close(
        paged.logits(ids[60:], 60, block_ids, output_rows=[39]), full[[99]], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers_generate(tiny_model_factory, family, backend):
    path, hf = tiny_model_factory(family)
    batch = prompts(hf.config.vocab_size)
    llm = LLM(str(path), dtype="float32", block_size=BLOCK_SIZE, num_blocks=256, attention_backend=backend)
    outputs = llm.generate(batch, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    for ids, out in zip(batch, outputs):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
        expected = ref[0, len(ids) :].tolist()
        assert out.outputs[0].token_ids == expected, f"prompt of {len(ids)} tokens"
        expected_reason = "stop" if expected[-1] == hf.config.eos_token_id else "length"
        assert out.outputs[0].finish_reason == expected_reason
