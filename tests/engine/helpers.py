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
