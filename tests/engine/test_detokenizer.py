"""Incremental detokenization and stop strings, on a byte-level BPE and a SentencePiece-style tokenizer."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from lmserve.engine.detokenizer import IncrementalDetokenizer, TextStream
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Deich — déjà vu",
    "rocket 🚀🛰 and 東京都 mixed in",
    "  leading spaces and trailing  ",
]


@pytest.fixture(scope="module")
def byte_level(tiny_llama):
    return Tokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def sentencepiece_style(tmp_path_factory):
    """Llama-2-like: '▁' for spaces, byte fallback for characters outside the vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for piece in ["▁"] + list("abcdefghijklmnopqrstuvwxyzHTW,.—") + ["▁t", "▁th", "▁the", "is", "▁is"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("i", "s"), ("▁", "is")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    path = tmp_path_factory.mktemp("sp")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return Tokenizer.from_pretrained(path)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece_style"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decoded_text_and_never_has_broken_characters(request, kind, text):
    tokenizer = request.getfixturevalue(kind)
    prompt = tokenizer.encode("The prompt", add_special_tokens=False)
    ids = tokenizer.encode(" " + text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-token words and multi-byte characters are exercised
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    expected = tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)) :]
    assert "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas)


def spell(tokenizer, text):
    """One token per character, so stop strings straddle token boundaries."""
    return [tokenizer.encode(ch, add_special_tokens=False) for ch in text]


def stream(tokenizer, pieces, **params):
    ts = TextStream(tokenizer, [], SamplingParams(**params))
    emitted, consumed = [], 0
    for piece in pieces:
        emitted.append(ts.push(piece))
        consumed += 1
        if ts.stopped:
            break
    emitted.append(ts.finish())
    return ts, emitted, consumed


def test_stop_string_across_tokens_is_cut_and_never_leaks(byte_level):
    ts, emitted, consumed = stream(byte_level, spell(byte_level, "hello END world"), stop=["END"])
    assert ts.text == "hello " and "".join(emitted) == "hello "
    assert consumed == len("hello END")
    # While 'E' and 'EN' were pending, nothing of them was emitted.
    assert all("E" not in e for e in emitted)


def test_partial_stop_string_is_released_when_it_does_not_complete(byte_level):
    ts, emitted, _ = stream(byte_level, spell(byte_level, "a EN b EX"), stop=["END"])
    assert not ts.stopped and "".join(emitted) == "a EN b EX"


def test_stop_string_can_be_kept_and_earliest_of_several_wins(byte_level):
    ts, emitted, _ = stream(byte_level, spell(byte_level, "x.y;z"), stop=[";", "."], include_stop_str_in_output=True)
    assert ts.text == "x." and "".join(emitted) == "x."
