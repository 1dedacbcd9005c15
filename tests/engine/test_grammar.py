"""Constrained decoding in the engine (lmserve/engine/grammar.py and the sampler's grammar masks) on
a tiny random Llama: whatever the weights, the output parses and validates; free rows beside
constrained ones keep their tokens; preemption never advances a matcher twice."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.engine.config import EngineConfig
from lmserve.engine.engine import Engine
from lmserve.engine.grammar import GrammarCompiler, GrammarError, StructuredDecoder
from lmserve.engine.sampler import Sampler
from lmserve.engine.sampling_params import StructuredOutputs
from tests.engine.helpers import make_seq
from tests.engine.test_engine import crowd, make_prompts
from tests.tiny_models import VOCAB_SIZE

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "size": {
            "type": "object",
            "properties": {"w": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
            "required": ["w", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "color", "tags", "size"],
    "additionalProperties": False,
}
SPEC = StructuredOutputs.from_schema(SCHEMA)
TINY_EOS = 1


def constrained(temperature: float = 0.0, seed: int | None = None, spec: StructuredOutputs = SPEC) -> SamplingParams:
    return SamplingParams(max_tokens=300, temperature=temperature, seed=seed, structured=spec)


def check_json(llm: LLM, token_ids: list[int]) -> dict:
    value = json.loads(llm.tokenizer.decode(token_ids))
    jsonschema.validate(value, SCHEMA)
    return value


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), num_blocks=512, enable_prefix_caching=False)


def test_output_parses_and_validates_greedy_and_sampled(llm):
    prompts = make_prompts(11, 4, 5, 60)
    params = [constrained(), constrained(0.8, seed=3), constrained(1.0, seed=4), constrained(1.5, seed=5)]
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop"
        check_json(llm, completion.token_ids)
    assert len(llm.engine.structured) == 0  # every matcher was released with its sequence


def test_each_schema_is_compiled_once(llm):
    compiler = llm.engine.structured.compiler
    before = compiler.num_compiled
    fresh = StructuredOutputs.from_schema({**SCHEMA, "title": "compiled once"})
    n_two = SamplingParams(max_tokens=300, temperature=1.0, seed=9, n=2, structured=fresh)
    llm.generate(make_prompts(12, 2, 5, 20), [constrained(spec=fresh), n_two], use_tqdm=False)
    assert compiler.num_compiled == before + 1  # three sequences, one compilation
    other = StructuredOutputs.from_schema({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                           "required": ["ok"], "additionalProperties": False})
    llm.generate(make_prompts(13, 1, 5, 20), constrained(spec=other), use_tqdm=False)
    llm.generate(make_prompts(14, 1, 5, 20), constrained(spec=fresh), use_tqdm=False)
    assert compiler.num_compiled == before + 2


def test_invalid_schema_is_refused_and_adds_nothing(tiny_llama):
    engine = Engine(EngineConfig.from_kwargs(model=str(tiny_llama), num_blocks=64))
    bad = StructuredOutputs.from_schema({"type": "object", "properties": {"a": {"type": "no-such-type"}}}, "tools")
    with pytest.raises(GrammarError) as raised:
        engine.add_request("bad", [5, 6, 7], constrained(spec=bad))
    assert raised.value.param == "tools"
    assert not engine.has_unfinished_requests() and len(engine.structured) == 0


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> tuple[dict, list[set]]:
    """Adds the requests, steps to the end; (tokens by request, request ids that got a token per step)."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in requests}
    steps = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps.append({o.request_id for o in outputs if o.new_token_ids})
        for o in outputs:
            tokens[o.request_id] += o.new_token_ids
    return tokens, steps


def test_free_rows_beside_constrained_ones_keep_their_tokens(tiny_llama):
    engine = Engine(EngineConfig.from_kwargs(model=str(tiny_llama), num_blocks=256, enable_prefix_caching=False))
    free_prompt, other_prompt = make_prompts(15, 2, 8, 30)
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference, _ = run(engine, {"free": (free_prompt, free), "other": (other_prompt, free)})
    mixed, steps = run(engine, {"free2": (free_prompt, free), "json": (other_prompt, constrained())})
    assert mixed["free2"] == reference["free"]
    assert any({"free2", "json"} <= step for step in steps)  # sampled in the same batch
    value = json.loads(engine_text(tiny_llama, mixed["json"]))
    jsonschema.validate(value, SCHEMA)


def engine_text(model_path, token_ids: list[int]) -> str:
    from lmserve.engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model_path).decode(token_ids)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_constrained_sequences_end_as_if_never_preempted(tiny_llama, llm, mode):
    prompts = make_prompts(16, 3, 5, 120)
    params = [constrained(), constrained(1.0, seed=21), constrained(0.7, seed=22)]
    alone = [llm.generate([p], q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(prompts, params)]
    others, other_params = crowd(3)
    pressed = LLM(str(tiny_llama), num_blocks=64, max_num_batched_tokens=512, preemption_mode=mode)
    outputs = pressed.generate(others[:40] + prompts, other_params[:40] + params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs[40:]]
    assert got == alone
    for token_ids in got:
        check_json(llm, token_ids)
    assert pressed.engine.stats().num_preemptions > 0


def make_decoder(tiny_llama) -> StructuredDecoder:
    return StructuredDecoder(GrammarCompiler(tiny_llama, VOCAB_SIZE, TINY_EOS))


def test_sampler_masks_only_constrained_rows(tiny_llama):
    decoder = make_decoder(tiny_llama)
    sampler = Sampler(VOCAB_SIZE, [TINY_EOS], structured=decoder)
    free = make_seq(4, params=SamplingParams(max_tokens=8, temperature=0.0))
    json_seq = make_seq(4, params=constrained())
    decoder.add([free, json_seq])
    logits = torch.randn(2, VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    free_token, json_token = (r.token_id for r in sampler(logits, [free, json_seq]))
    assert torch.equal(logits, original)  # the caller's logits are not changed
    assert free_token == int(original[0].argmax())
    allowed = decoder.allowed_tokens([json_seq], VOCAB_SIZE)[0]
    assert allowed[json_token] and allowed.sum() < VOCAB_SIZE
    assert engine_text(tiny_llama, [json_token]).startswith("{")


def test_a_matcher_follows_the_output_once_however_often_it_is_synced(tiny_llama):
    """A recomputed sequence (preempted, its KV cache rebuilt) samples again from the same output
    tokens: syncing again must not consume them again."""
    decoder = make_decoder(tiny_llama)
    seq = make_seq(4, params=constrained())
    decoder.add([seq])
    text_ids = decoder.compiler._llg_tokenizer().tokenize_str('{"name":"ab')
    seq.token_ids += text_ids
    first = decoder.allowed_tokens([seq], VOCAB_SIZE)
    second = decoder.allowed_tokens([seq], VOCAB_SIZE)
    assert (first == second).all() and first.any()
    assert not decoder.completed([seq])
    decoder.release(seq.seq_id)
    assert len(decoder) == 0


def test_the_cache_keeps_the_most_recently_used_schemas(tiny_llama):
    compiler = GrammarCompiler(tiny_llama, VOCAB_SIZE, TINY_EOS, capacity=2)
    a, b, c = (StructuredOutputs.from_schema({"type": "object", "title": t}) for t in "abc")
    for spec in (a, b, a, c, a, b):  # c evicts b (a was used after b); b then evicts c
        compiler.matcher(spec)
    assert compiler.num_compiled == 4
    with pytest.raises(ValueError, match="capacity"):
        GrammarCompiler(tiny_llama, VOCAB_SIZE, TINY_EOS, capacity=0)
