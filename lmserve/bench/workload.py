"""What a benchmark sends: requests with prompt and output lengths, drawn from a seed."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RequestSpec:
    """One request: a prompt (token ids or text) and how many tokens to generate."""

    prompt: list[int] | str
    output_len: int

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


def from_jsonl(path: Path, default_output_len: int) -> list[RequestSpec]:
    """Lines of {"prompt": "..." | [ids], "max_tokens": n}."""
    specs = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                specs.append(RequestSpec(item["prompt"], int(item.get("max_tokens", default_output_len))))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": ..., \"max_tokens\": n}} ({exc})") from None
    if not specs:
        raise ValueError(f"{path} holds no requests")
    return specs


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
