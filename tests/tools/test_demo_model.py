"""The shipped demo model (lmserve/demo_model/) and the script that trains it (tools/train_demo_model.py)."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmserve.demo_model import model_dir
from tools import demo_chat
from tools.demo_corpus import Corpus, clean_fortune, parse_fortunes, parse_kjv

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = model_dir()
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "training.json", "heldout.jsonl", "README.md",
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)


def heldout_words() -> set[str]:
    """Every word of the held-out text: English the model was never trained on, as a dictionary."""
    corpus = Corpus.load(MODEL_DIR / "heldout.jsonl")
    return {w.lower() for doc in corpus.documents() for w in re.findall(r"[A-Za-z]+", doc)}


def test_directory_is_small_and_complete():
    for name in MODEL_FILES:
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total < 10 * 1024 * 1024


def test_loads_as_a_llama_model_with_its_stored_dtype(model):
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(str(MODEL_DIR)).dtype == torch.bfloat16
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000


def test_tokenizer_round_trips_text_and_starts_with_bos(tokenizer):
    text = "In the beginning God created the heaven and the earth.\n  -- Genesis 1:1, café ünïcode 42!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert 2000 <= len(tokenizer) <= 8192
    assert len(ids) < len(text) / 2  # BPE merges, not bytes


def test_chat_template_with_and_without_system_message(tokenizer):
    user = [{"role": "user", "content": "Tell me a fortune."}]
    system = [{"role": "system", "content": "Answer briefly."}]
    rendered = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|user|>\nTell me a fortune.</s>\n<|assistant|>\n"
    rendered = tokenizer.apply_chat_template(system + user, tokenize=False, add_generation_prompt=False)
    assert rendered == "<s><|system|>\nAnswer briefly.</s>\n<|user|>\nTell me a fortune.</s>\n"
    ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids
    with pytest.raises(Exception, match="roles"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_greedy_chat_reply_is_mostly_english_words(model, tokenizer):
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a fortune."}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    output = model.generate(input_ids, max_new_tokens=48, do_sample=False)
    reply = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", reply)]
    assert len(words) >= 5, reply
    known = heldout_words()
    assert sum(w in known for w in words) / len(words) >= 0.8, reply


def test_sampled_chat_replies_end_with_eos(model, tokenizer):
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something wise."}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    num_finished = 0
    for seed in range(3):
        torch.manual_seed(seed)
        output = model.generate(input_ids, max_new_tokens=100, do_sample=True, temperature=0.8)
        num_finished += int(output[0, -1] == tokenizer.eos_token_id)
    assert num_finished >= 2


def test_recorded_perplexity_matches_the_shipped_weights():
    report = json.loads((MODEL_DIR / "training.json").read_text())
    perplexity = report["evaluation"]["perplexity"]
    assert 1 < perplexity < 100
    assert str(round(perplexity, 2)) in (MODEL_DIR / "README.md").read_text()
    assert set(report["data"]["debian_packages"]) == {"bible-kjv", "bible-kjv-text", "fortunes-min", "fortunes"}


def test_parse_kjv_names_books_in_order():
    text = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\nExo1:1 Now these.\n"
    chapters = parse_kjv(text)
    assert [(c.book, c.chapter, len(c.verses)) for c in chapters] == [
        ("Genesis", 1, 2), ("Genesis", 2, 1), ("Exodus", 1, 1),
    ]
    assert chapters[0].document() == "Genesis 1\nIn the beginning.\nAnd the earth."


def test_fortunes_are_cleaned_and_odd_ones_dropped():
    raw = (
        "Plus ,\bca change, plus c'est la m^\beme chose.\n\t\t-- Alphonse Karr\n%\n"
        "A man who is long enough on a line like this one, and it goes on and\nwraps here.\n%\n"
        "#include <stdio.h>\nint main() { return 0; }\n%\n"
    )
    fortunes = parse_fortunes(raw, category="test")
    assert [f.text for f in fortunes] == [
        "Plus ca change, plus c'est la meme chose.\n-- Alphonse Karr",
        "A man who is long enough on a line like this one, and it goes on and wraps here.",
    ]
    assert clean_fortune("Roses are red,\nViolets are blue.") == "Roses are red,\nViolets are blue."


def test_heldout_split_and_chat_examples_are_deterministic():
    corpus = Corpus.load(MODEL_DIR / "heldout.jsonl")
    train, heldout = corpus.split()
    assert len(heldout.chapters) == len(corpus.chapters[12::25])
    assert heldout.fortunes == corpus.fortunes[12::25]
    first = demo_chat.conversations(train, random.Random(7), num_verse_examples=10)
    assert first == demo_chat.conversations(train, random.Random(7), num_verse_examples=10)
    for conversation in first:
        assert conversation[-1]["role"] == "assistant" and conversation[-2]["role"] == "user"


def test_training_script_runs_end_to_end_in_a_tiny_setting(tmp_path):
    out = tmp_path / "model"
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "train_demo_model.py"), "--tiny", "--max-steps", "3",
        "--corpus", str(MODEL_DIR / "heldout.jsonl"), "--out", str(out), "--work-dir", str(tmp_path / "work"),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    for name in MODEL_FILES:
        assert (out / name).is_file(), name
    report = json.loads((out / "training.json").read_text())
    assert report["training"]["steps"] == 3 and math.isfinite(report["evaluation"]["perplexity"])
    tiny_tokenizer = AutoTokenizer.from_pretrained(str(out))
    tiny_model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi."}], add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    assert tiny_model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tiny_tokenizer))


@pytest.mark.slow
def test_wheel_ships_the_demo_model(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO_ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("lmserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in MODEL_FILES:
        assert f"lmserve/demo_model/{name}" in names
