"""The offline API with text: prompts, chat, stop strings, n, logprobs."""

import pytest

from lmserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), num_blocks=256)


def test_text_prompts_come_back_in_order_with_text_matching_tokens(llm):
    prompts = ["The quick brown fox", "Paged attention", "Hello"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) >= 1 and c.finish_reason in ("stop", "length")
        assert c.text == llm.tokenizer.decode(o.prompt_token_ids + c.token_ids)[len(llm.tokenizer.decode(o.prompt_token_ids)):]


def test_token_id_prompt_and_single_prompt_forms(llm):
    a = llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    b = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(a) == 1 and a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)
    assert out[0].prompt == "<|user|>Hi</s><|assistant|>"
    assert len(out[0].outputs[0].token_ids) >= 1


def test_stop_string_ends_the_sequence_with_stop(llm):
    free = llm.generate(["The quick"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)
    text = free[0].outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(["The quick"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert len(out.token_ids) < len(free[0].outputs[0].token_ids)


def test_n_completions_with_seed_are_distinct_and_reproducible(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=7)
    a = llm.generate(["Hello"], params, use_tqdm=False)[0]
    b = llm.generate(["Hello"], params, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_logprobs_per_token(llm):
    out = llm.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token_id, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token_id and lp.rank == 1 and len(lp.top) == 3 and lp.top[0][0] == token_id


def test_bad_prompts_are_refused_before_anything_runs(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""], use_tqdm=False)
    with pytest.raises(ValueError, match="must be a string or a list of token ids"):
        llm.generate([3.5], use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
