"""What a benchmark sends: requests with prompt and output lengths, drawn from a seed or a dataset."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

CHARS_PER_TOKEN = 4
"""ShareGPT answers are text; without the endpoint's tokenizer their length in tokens is estimated at
about four characters a token (English BPE vocabularies), then kept inside --output-len."""


@dataclass(frozen=True)
class RequestSpec:
    """One request: a prompt (token ids or text) or chat messages, and how many tokens to generate.

    With `messages` set the request goes to /chat/completions and `prompt` is unused ("")."""

    prompt: list[int] | str
    output_len: int
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def prompt_len(self) -> int | None:
        return len(self.prompt) if isinstance(self.prompt, list) else None


def w1(num_requests: int = 128, seed: int = 0) -> list[RequestSpec]:
    """The engine benchmark's W1: prompts of 64-512 random token ids, 32-256 output tokens."""
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(num_requests):
        prompt_len = int(rng.integers(64, 513))
        output_len = int(rng.integers(32, 257))
        ids = rng.integers(100, 31900, size=prompt_len).tolist()
        specs.append(RequestSpec(ids, output_len))
    return specs


def random_token_ids(
    num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: tuple[int, int], seed: int
) -> list[RequestSpec]:
    """Prompts of random token ids with lengths uniform in the given inclusive ranges."""
    rng = random.Random(seed)
    return [
        RequestSpec([rng.randint(*vocab) for _ in range(rng.randint(*input_len))], rng.randint(*output_len))
        for _ in range(num_requests)
    ]


def from_dataset(path: Path, num_requests: int | None, output_len: tuple[int, int]) -> list[RequestSpec]:
    """The requests of a dataset file, in file order: the first `num_requests` of them, or all when None.

    When more are asked for than the file holds, it is read again from the top (a small trace can
    drive a long run). A `.json` file is ShareGPT (a list of {"conversations": [{from, value}]}); any
    other is JSONL (see `from_jsonl`)."""
    try:
        specs = from_sharegpt(path, output_len) if path.suffix == ".json" else from_jsonl(path, output_len[1])
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if num_requests is None:
        return specs
    return list(islice(cycle(specs), num_requests))


def from_jsonl(path: Path, default_output_len: int) -> list[RequestSpec]:
    """Lines of {"prompt": "..." | [ids], "max_tokens": n} or {"messages": [{role, content}], "max_tokens": n}."""
    specs = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                specs.append(_jsonl_spec(json.loads(line), default_output_len))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": ...}} or {{\"messages\": [...]}} "
                                 f"with an optional \"max_tokens\": n ({exc})") from None
    if not specs:
        raise ValueError(f"{path} holds no requests")
    return specs


def _jsonl_spec(item: dict[str, Any], default_output_len: int) -> RequestSpec:
    max_tokens = int(item.get("max_tokens", default_output_len))
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        return RequestSpec("", max_tokens, tuple({"role": str(m["role"]), "content": str(m["content"])}
                                                 for m in messages))
    prompt = item["prompt"]
    if not isinstance(prompt, (str, list)) or not prompt:
        raise ValueError("prompt must be a non-empty string or list of token ids")
    return RequestSpec(prompt, max_tokens)


def from_sharegpt(path: Path, output_len: tuple[int, int]) -> list[RequestSpec]:
    """ShareGPT conversations as vLLM's benchmark_serving reads them: the first human turn is the
    prompt; the answer after it sets the output length (estimated tokens, clipped into `output_len`).
    Conversations without a human turn followed by an answer are skipped."""
    try:
        conversations = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(conversations, list):
        raise ValueError(f"{path}: expected a ShareGPT list of {{\"conversations\": [...]}}")
    specs = []
    for entry in conversations:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        pair = _first_exchange(turns) if isinstance(turns, list) else None
        if pair is not None:
            prompt, answer = pair
            estimate = math.ceil(len(answer) / CHARS_PER_TOKEN)
            specs.append(RequestSpec(prompt, min(max(estimate, output_len[0]), output_len[1])))
    if not specs:
        raise ValueError(f"{path} holds no ShareGPT conversation with a human turn and an answer")
    return specs


def _first_exchange(turns: list[Any]) -> tuple[str, str] | None:
    """The first human turn with text and the turn that answers it."""
    for question, answer in zip(turns, turns[1:]):
        if not (isinstance(question, dict) and isinstance(answer, dict)):
            return None
        if question.get("from") == "human" and question.get("value") and isinstance(answer.get("value"), str):
            return str(question["value"]), answer["value"]
    return None


def parse_range(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64:512' -> (64, 512)."""
    low, _, high = text.partition(":")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"expected N or LOW:HIGH, got {text!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise ValueError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return bounds


def parse_list(text: str, kind: type[int] | type[float], flag: str) -> list[Any]:
    """'1,2,4' -> [1, 2, 4] (each value > 0); a ValueError naming `flag` otherwise."""
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected a comma list of numbers like 1,2,4, got {text!r}") from None
    if any(not value > 0 for value in values):
        raise ValueError(f"{flag}: every value must be > 0, got {text!r}")
    return values
