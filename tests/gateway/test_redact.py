import random

import pytest

from lmserve.gateway.redact import Redactor

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
