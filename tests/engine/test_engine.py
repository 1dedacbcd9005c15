"""The engine as a whole on a tiny random Llama: invariance under batching, caching, preemption;
prefix-cache savings; bad input."""

import random

import pytest

from lmserve import LLM, SamplingParams
from lmserve.engine.config import EngineConfig
from lmserve.engine.engine import Engine

SHARED_PREFIX_LEN = 200


def make_prompts(seed: int, count: int, low: int, high: int, vocab: int = 512):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


TARGETS = make_prompts(1, 4, 5, 200)
TARGET_PARAMS = [
    SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=32, temperature=1.0, seed=1234, ignore_eos=True),
]


def crowd(seed: int = 2):
    """60 other requests of mixed prompt and output lengths, some sampling without a seed."""
    rng = random.Random(seed)
    prompts = make_prompts(seed, 60, 1, 120)
    params = [
        SamplingParams(max_tokens=rng.randint(1, 40), temperature=rng.choice([0.0, 0.8]), ignore_eos=True)
        for _ in prompts
    ]
    return prompts, params


def generate_targets(llm, params, others=((), ())):
    """Runs the targets (with `params`) interleaved among `others`; returns the targets' tokens."""
    prompts, plist, is_target = [], [], []
    other_prompts, other_params = list(others[0]), list(others[1])
    for i, target in enumerate(TARGETS):
        prompts += other_prompts[i * 15 : (i + 1) * 15] + [target]
        plist += other_params[i * 15 : (i + 1) * 15] + [params]
        is_target += [False] * len(other_prompts[i * 15 : (i + 1) * 15]) + [True]
    outputs = llm.generate(prompts, plist, use_tqdm=False)
    return [o.outputs[0].token_ids for o, t in zip(outputs, is_target) if t]


@pytest.fixture(scope="module")
def alone(tiny_llama):
    """Each target run on its own, no prefix caching."""
    llm = LLM(str(tiny_llama), num_blocks=512, enable_prefix_caching=False)
    return {
        i: [llm.generate([t], p, use_tqdm=False)[0].outputs[0].token_ids for t in TARGETS]
        for i, p in enumerate(TARGET_PARAMS)
    }


@pytest.mark.parametrize("which", [0, 1], ids=["greedy", "seeded"])
@pytest.mark.parametrize(
    "setting",
    [
        dict(num_blocks=1024),
        dict(num_blocks=1024, max_num_batched_tokens=32),
        dict(num_blocks=64, max_num_batched_tokens=512),
    ],
    ids=["among-64", "chunked-budget-32", "preempting"],
)
def test_output_does_not_depend_on_what_runs_beside_it(tiny_llama, alone, which, setting):
    llm = LLM(str(tiny_llama), **setting)
    got = generate_targets(llm, TARGET_PARAMS[which], crowd())
    assert got == alone[which]
    if setting["num_blocks"] == 64:
        assert llm.engine.stats().num_preemptions > 0


@pytest.mark.parametrize("which", [0, 1], ids=["greedy", "seeded"])
def test_output_does_not_depend_on_prefix_cache_hits(tiny_llama, which):
    prefix = make_prompts(7, 1, SHARED_PREFIX_LEN, SHARED_PREFIX_LEN)[0]
    suffixes = make_prompts(8, 6, 1, 40)
    prompts = [prefix + s for s in suffixes]
    params = TARGET_PARAMS[which]
    reference = LLM(str(tiny_llama), num_blocks=512, enable_prefix_caching=False)
    expected = [reference.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    llm = LLM(str(tiny_llama), num_blocks=512, max_num_batched_tokens=256)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    assert all(o.num_cached_tokens >= SHARED_PREFIX_LEN - 16 for o in rest)
    assert llm.engine.stats().prefix_cache_hits > 0


def test_second_request_with_the_same_prefix_computes_only_uncached_tokens(tiny_llama):
    engine = Engine(EngineConfig.from_kwargs(model=str(tiny_llama), num_blocks=128, block_size=16))
    prefix = make_prompts(3, 1, 256, 256)[0]
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def run(request_id, prompt):
        before = engine.stats()
        engine.add_request(request_id, prompt, params)
        computed = 0
        while engine.has_unfinished_requests():
            engine.step()
            computed += engine.stats().last_step_num_tokens
        after = engine.stats()
        return computed, after.prefix_cache_hits - before.prefix_cache_hits

    assert run("a", prefix + [5, 6, 7]) == (259, 0)
    # Same 256-token prefix (16 full blocks), 5 different tokens: only those 5 are computed.
    assert run("b", prefix + [9, 10, 11, 12, 13]) == (5, 256)
    stats = engine.stats()
    assert stats.prefix_cache_queries == 259 + 261 and stats.prefix_cache_hits == 256


def test_bad_requests_fail_clearly_and_others_keep_running(tiny_llama):
    engine = Engine(EngineConfig.from_kwargs(model=str(tiny_llama), num_blocks=64, max_model_len=128))
    engine.add_request("good", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    tokens = [t for out in engine.step() for t in out.new_token_ids]
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len is 128"):
        engine.add_request("long", [5] * 128, SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("oov", [5, 512], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", [5], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=1.5)
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert len(tokens) == 8


def test_abort_frees_everything(tiny_llama):
    engine = Engine(EngineConfig.from_kwargs(model=str(tiny_llama), num_blocks=64))
    engine.add_request("a", list(range(2, 60)), SamplingParams(max_tokens=50, n=2))
    engine.add_request("b", list(range(2, 30)), SamplingParams(max_tokens=50))
    engine.step()
    engine.abort_request("a")
    assert engine.stats().num_running == 1
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_free_blocks == 64


@pytest.mark.parametrize("budget", [4096, 16])
def test_prompt_logprobs_match_transformers_across_chunks(tiny_model_factory, budget):
    import torch

    path, hf = tiny_model_factory("llama3")
    prompt = make_prompts(11, 1, 50, 50)[0]
    llm = LLM(str(path), num_blocks=64, max_num_batched_tokens=budget)
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2), use_tqdm=False)[0]
    with torch.inference_mode():
        expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[i - 1].topk(2).indices.tolist()
