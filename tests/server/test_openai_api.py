"""The OpenAI API as the official SDK uses it, against a real server process."""

import httpx
import pytest
from openai import OpenAI

from lmserve.engine.tokenizer import Tokenizer
from tests.server.conftest import MODEL_NAME


@pytest.fixture(scope="module")
def tokenizer(server):
    return Tokenizer.from_pretrained(server.popen.args[4])


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion_text_and_exact_usage(client, tokenizer):
    r = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.usage.prompt_tokens == len(tokenizer.encode("The quick brown fox"))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.choices[0].finish_reason == "length"


def test_prompt_forms_list_of_strings_and_token_ids(client):
    r = client.completions.create(model=MODEL_NAME, prompt=["Hello", "Paged attention"], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    ids = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3
    many = client.completions.create(model=MODEL_NAME, prompt=[[5, 6], [7, 8, 9]], max_tokens=2, n=2, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.usage.prompt_tokens == 5


def test_chat_applies_the_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0)
    expected = tokenizer.encode_chat(messages)
    assert r.usage.prompt_tokens == len(expected)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"


def test_streaming_matches_non_streaming_and_usage_comes_last(client):
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Tell me"}], max_tokens=16,
                  temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain)


def test_logit_bias_bans_the_greedy_token(client, tokenizer):
    kwargs = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=3, temperature=0)
    plain = client.completions.create(**kwargs)
    prompt_len = len(tokenizer.encode("The quick brown fox"))

    def output_ids(text: str) -> list[int]:
        return tokenizer.encode("The quick brown fox" + text)[prompt_len:]

    first = output_ids(plain.choices[0].text)[0]
    banned = client.completions.create(**kwargs, logit_bias={str(first): -100})
    assert first not in output_ids(banned.choices[0].text)
    forced = client.completions.create(**kwargs, logit_bias={str(first): 100})
    assert output_ids(forced.choices[0].text) == [first] * 3


def test_continuous_usage_stats_count_the_tokens_so_far_in_every_chunk(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    for create, kwargs in ((client.chat.completions.create, {"messages": [{"role": "user", "content": "Tell me"}]}),
                           (client.completions.create, {"prompt": "Once upon"})):
        chunks = list(create(model=MODEL_NAME, max_tokens=12, temperature=0, stream=True, stream_options=options,
                             extra_body={"ignore_eos": True}, **kwargs))
        counts = [c.usage.completion_tokens for c in chunks]  # every chunk carries usage, none is null
        assert counts == sorted(counts) and counts[-1] == 12 and counts[0] < 12
        assert len({c.usage.prompt_tokens for c in chunks}) == 1
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


def test_n_and_seed_are_reproducible(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once", max_tokens=10, temperature=1.0, n=2, seed=11)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == sum(1 for _ in range(2)) * 10 or a.usage.completion_tokens <= 20
    other = client.completions.create(**{**kwargs, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_string_across_token_boundaries_never_leaks(client):
    base = dict(model=MODEL_NAME, prompt="The quick", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    stop = full[5:9]
    cut = full[: full.index(stop)]
    r = client.completions.create(**base, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    streamed = list(client.completions.create(**base, stop=[stop], stream=True))
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == cut
    assert not any(stop[0] in p for p in pieces if stop[0] not in cut)


def test_logprobs_in_both_apis(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    c = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)


def test_repeated_prefix_reports_cached_tokens(client):
    prompt = " ".join(["Paged attention keeps keys and values in fixed size blocks."] * 8)
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL_NAME, prompt=prompt + " And more.", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


def test_request_id_is_echoed_or_generated(server):
    r = httpx.get(server.url + "/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = httpx.get(server.url + "/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    httpx.post(server.url + "/v1/completions", headers={"X-Request-ID": "log-me-42"},
               json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2})
    lines = [line for line in server.log().splitlines() if "log-me-42" in line]
    assert lines and '"msg":"request"' in lines[-1] and '"generation_tokens":2' in lines[-1]


def test_status_and_health(server):
    status = httpx.get(server.url + "/v1/status").json()
    assert status["state"] == "ready" and status["kv_cache_blocks"] == 512 and "kv_cache_usage" in status
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200


def test_echo_with_logprobs_lists_prompt_tokens_first(client, tokenizer):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, temperature=0, logprobs=1, echo=True,
                                  extra_body={"ignore_eos": True})
    choice = r.choices[0]
    num_prompt = len(tokenizer.encode(prompt))
    assert choice.text.startswith(prompt)
    assert len(choice.logprobs.tokens) == num_prompt + 3
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, temperature=0, logprobs=1,
                                            echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text == prompt
    assert chunks[0].choices[0].logprobs.token_logprobs[1:] == choice.logprobs.token_logprobs[1:num_prompt]
    assert "".join(c.choices[0].text for c in chunks) == choice.text


def test_engine_thread_mode_gives_the_same_answers(client, start_server):
    """`--engine-mode thread` steps the engine on a thread beside the event loop instead of in a child
    process; what a client gets must not depend on it."""
    threaded = start_server("--engine-mode", "thread")
    pid = threaded.popen.pid
    assert open(f"/proc/{pid}/task/{pid}/children").read().split() == []  # no engine process
    other = OpenAI(base_url=threaded.url + "/v1", api_key="unused", max_retries=0)
    kwargs = dict(model=MODEL_NAME, prompt="Both ways", max_tokens=12, temperature=0.8, seed=5, n=2, logprobs=2,
                  extra_body={"ignore_eos": True})
    ours, theirs = client.completions.create(**kwargs), other.completions.create(**kwargs)
    assert [c.text for c in ours.choices] == [c.text for c in theirs.choices]
    assert [c.logprobs.tokens for c in ours.choices] == [c.logprobs.tokens for c in theirs.choices]
    assert ours.usage == theirs.usage
    streamed = list(other.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.completion_tokens == 24
