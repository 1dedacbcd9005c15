import json
import random
import re
from pathlib import Path

import httpx
import pytest

from lmserve.gateway.config import config_from_dict
from lmserve.gateway.redact import Redactor
from tests.gateway.conftest import base_config

EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
KEY = r"sk-[A-Za-z0-9]{20,}"


def redactor() -> Redactor:
    return Redactor([EMAIL, KEY], "[REDACTED]", max_match_chars=64)


TEXT = "Mail alice.smith@example.com or bob@corp.io; the key is sk-ABCDEFGHIJKLMNOPQRSTUV and that's it."


def stream_through(red: Redactor, text: str, cuts: list[int]) -> str:
    state = red.stream()
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    out = [state.feed(0, piece, is_final=(i == len(pieces) - 1)) for i, piece in enumerate(pieces)]
    return "".join(out)


def test_whole_text() -> None:
    assert redactor().redact(TEXT) == "Mail [REDACTED] or [REDACTED]; the key is [REDACTED] and that's it."


@pytest.mark.parametrize("seed", range(50))
def test_any_chunking_gives_the_same_result_as_whole_text(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randint(1, 40)))
    assert stream_through(redactor(), TEXT, cuts) == redactor().redact(TEXT)


def test_one_character_chunks_never_leak_a_fragment() -> None:
    red = redactor()
    state = red.stream()
    sent = ""
    for ch in TEXT[:-1]:
        sent += state.feed(0, ch, is_final=False)
        assert "alice" not in sent and "ABCDEFGH" not in sent
    sent += state.feed(0, TEXT[-1], is_final=True)
    assert sent == red.redact(TEXT)


def test_flush_returns_held_text_per_choice() -> None:
    state = redactor().stream()
    assert state.feed(0, "short", is_final=False) == ""
    assert state.feed(1, "x@y.com", is_final=False) == ""
    assert state.flush() == {0: "short", 1: "[REDACTED]"}


def test_bad_pattern_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Redactor(["(unclosed"], "x", 10)


def named(*names: str) -> Redactor:
    return Redactor([], "[REDACTED]", max_match_chars=64, named=list(names))


@pytest.mark.parametrize("name, secret", [
    ("email", "jane.doe+x@mail.example.co.uk"),
    ("phone", "+1 (415) 555-2671"), ("phone", "415-555-2671"), ("phone", "+442079460958"),
    ("card_number", "4111 1111 1111 1111"), ("card_number", "5500-0000-0000-0004"), ("card_number", "4012888888881881"),
    ("api_key", "sk-proj-abcdEFGH1234ijklMNOP5678"), ("api_key", "AKIAIOSFODNN7EXAMPLE"),
    ("api_key", "ghp_" + "a1B2" * 9), ("bearer_token", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc"),
])
def test_named_pattern_sets(name: str, secret: str) -> None:
    assert named(name).redact(f"see {secret}, ok") == "see [REDACTED], ok"


@pytest.mark.parametrize("name, text", [
    ("card_number", "order 4111 1111 1111 1112 shipped"),  # fails the Luhn checksum
    ("phone", "in 2024 we sold 1234567 units"), ("api_key", "a task-list and sk-short"),
    ("email", "write to me at home"),
])
def test_named_pattern_sets_leave_lookalikes(name: str, text: str) -> None:
    assert named(name).redact(text) == text


@pytest.mark.parametrize("patterns, named_sets, message", [
    (["(unclosed"], [], "redaction.patterns[0] '(unclosed' does not compile"),
    (["a*"], [], "matches the empty string"),
    ([], ["email", "passport"], "unknown name(s) ['passport']"),
    ("sk-.*", [], "must be a list of strings"),
])
def test_config_rejects_bad_patterns_and_names_in_one_line(patterns, named_sets, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        config_from_dict({"redaction": {"patterns": patterns, "named_patterns": named_sets}})
    assert "\n" not in str(raised.value)


SECRET_TOKENS = ["Mail", " alice", ".smith", "@", "example", ".com", " now", "."]


def chat_logprobs(tokens: list[str]) -> dict:
    def entry(token: str) -> dict:
        return {"token": token, "logprob": -1.0, "bytes": list(token.encode())}
    return {"content": [{**entry(t), "top_logprobs": [entry(t), entry("bob@corp.io")]} for t in tokens]}


def test_whole_chat_logprobs_mask_the_tokens_of_a_secret() -> None:
    body = {"choices": [{"index": 0, "message": {"content": "".join(SECRET_TOKENS)},
                         "logprobs": chat_logprobs(SECRET_TOKENS)}]}
    redactor().redact_response(body)
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Mail [REDACTED] now."
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == ["Mail", " [REDACTED]", " now", "."]
    assert content[1] == {"token": " [REDACTED]", "logprob": -5.0, "bytes": list(b" [REDACTED]"), "top_logprobs": []}
    assert content[0]["top_logprobs"][1]["token"] == "[REDACTED]"  # an alternative spelling a secret
    assert "@" not in str(body)


def test_whole_completion_logprobs_recompute_offsets() -> None:
    offsets = [sum(len(t) for t in SECRET_TOKENS[:i]) for i in range(len(SECRET_TOKENS))]
    body = {"choices": [{"index": 0, "text": "".join(SECRET_TOKENS), "logprobs": {
        "tokens": SECRET_TOKENS, "token_logprobs": [-1.0] * 8, "top_logprobs": [{t: -1.0} for t in SECRET_TOKENS],
        "text_offset": offsets}}]}
    redactor().redact_response(body)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["Mail", " [REDACTED]", " now", "."]
    assert logprobs["text_offset"] == [0, 4, 15, 19]
    assert "alice" not in str(body) and "example" not in str(body)


def test_unknown_logprobs_layout_is_dropped() -> None:
    body = {"choices": [{"index": 0, "text": "x", "logprobs": {"spelled": "alice@example.com"}}]}
    redactor().redact_response(body)
    assert body["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("seed", range(30))
def test_streamed_logprobs_hold_back_a_secret_split_over_chunks(seed: int) -> None:
    """Any split of the tokens into chunks releases the same entries as the whole answer."""
    rng = random.Random(seed)
    tokens = [TEXT[i:i + n] for i, n in _pieces(rng, len(TEXT))]
    state = redactor().stream()
    released: list[dict] = []
    cuts = sorted(rng.sample(range(1, len(tokens)), rng.randint(1, min(10, len(tokens) - 1))))
    for a, b in zip([0, *cuts], [*cuts, len(tokens)]):
        out = state.logprobs.feed(0, chat_logprobs(tokens[a:b]), is_final=b == len(tokens))
        released += out["content"] if out else []
        assert "alice" not in str(released) and "ABCDEFGH" not in str(released)
    whole = {"choices": [{"index": 0, "logprobs": chat_logprobs(tokens)}]}
    redactor().redact_response(whole)
    assert released == whole["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in released) == redactor().redact(TEXT)


def _pieces(rng: random.Random, size: int) -> list[tuple[int, int]]:
    out, at = [], 0
    while at < size:
        n = rng.randint(1, 6)
        out.append((at, n))
        at += n
    return out


SECRET = "alice.smith@example.com"
CONTENT = f"Contact {SECRET}, or call +1 415-555-2671, bye."


def _spelled(raw: bytes) -> str:
    """Every string value in an answer's choices (whole JSON or SSE events), `bytes` lists decoded,
    one a line."""
    docs = [raw] if raw.startswith(b"{") else [line[6:] for line in raw.splitlines()
                                               if line.startswith(b"data: {")]
    out: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key == "bytes" and isinstance(value, list):
                    out.append(bytes(value).decode("utf-8", "replace"))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    for doc in docs:
        walk(json.loads(doc).get("choices"))
    return "\n".join(out)


@pytest.mark.parametrize("path, extra", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_secret_is_nowhere_in_the_answer_logprobs_included(backends, gateway_factory, tmp_path: Path,
                                                           path: str, extra: dict, stream: bool) -> None:
    a = backends("a")
    a.control(content=CONTENT, chunk_chars=3)  # one token per 3 characters, so the secret spans many
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}],
                                     redaction={"named_patterns": ["email", "phone"], "max_match_chars": 64}))
    headers = {"authorization": f"Bearer {gw.create_key()}"}
    body = {"model": "m", **extra, "stream": stream}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", gw.url + path, json=body, headers=headers) as response:
            raw = response.read()
    assert response.status_code == 200, raw
    spelled = _spelled(raw)
    assert "Contact [REDACTED], or call [REDACTED], bye." in spelled.replace("\n", "") or not stream
    for fragment in [SECRET[i:i + 3] for i in range(len(SECRET) - 2)] + ["555", "2671", "415"]:
        assert fragment not in spelled, (fragment, spelled)
    for secret in (SECRET.encode(), b"2671", str(list(b"lic"))[1:-1].encode()):
        assert secret not in raw
    tokens = _tokens(raw, path)
    assert "".join(tokens) == "Contact [REDACTED], or call [REDACTED], bye."


def _tokens(raw: bytes, path: str) -> list[str]:
    """The tokens of every logprobs object in the answer, in order."""
    docs = [raw] if raw.startswith(b"{") else [line[6:] for line in raw.splitlines() if line.startswith(b"data: {")]
    tokens: list[str] = []
    for doc in docs:
        for choice in json.loads(doc).get("choices") or []:
            logprobs = choice.get("logprobs") or {}
            if path.endswith("chat/completions"):
                tokens += [e["token"] for e in logprobs.get("content") or []]
            else:
                tokens += logprobs.get("tokens") or []
    return tokens
