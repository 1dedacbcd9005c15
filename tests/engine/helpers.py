"""Builders shared by the pure-Python engine tests."""

from __future__ import annotations

import itertools

from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.sequence import Sequence

_ids = itertools.count()


def make_seq(num_prompt_tokens: int, max_tokens: int = 16, first_token: int = 1, **kwargs) -> Sequence:
    params = kwargs.pop("params", None) or SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seq_id = next(_ids)
    return Sequence(
        seq_id=seq_id,
        request_id=f"req-{seq_id}",
        index=0,
        token_ids=list(range(first_token, first_token + num_prompt_tokens)),
        num_prompt_tokens=num_prompt_tokens,
        params=params,
        arrival_time=float(seq_id),
        **kwargs,
    )


class FakeClock:
    """An engine clock that moves only when told: tests measure time in steps, not seconds."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        self.now += seconds
