"""The sampler on hand-made logits: filters, penalties, seeds, log-probabilities."""

import math

import pytest
import torch

from lmserve.engine.sampler import Sampler, derive_seed
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.sequence import Sequence

EOS = 3


def seq(params, prompt=(5, 6), output=(), index=0):
    ids = list(prompt) + list(output)
    return Sequence(seq_id=0, request_id="r", index=index, token_ids=ids, num_prompt_tokens=len(prompt),
                    params=params, arrival_time=0.0)


def logits_for(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float32))


def draw(params_kwargs, probs, n, **seq_kwargs):
    sampler = Sampler(len(probs), [EOS], seed=0)
    counts = [0] * len(probs)
    for i in range(n):
        p = SamplingParams(**params_kwargs, seed=i)
        counts[sampler(logits_for(probs), [seq(p, **seq_kwargs)])[0].token_id] += 1
    return counts


def test_greedy_takes_argmax():
    out = Sampler(4, [EOS])(logits_for([0.1, 0.2, 0.6, 0.1]), [seq(SamplingParams(temperature=0))])
    assert out[0].token_id == 2


def test_sampling_follows_the_distribution():
    counts = draw(dict(temperature=1.0), [0.1, 0.2, 0.6, 0.1], 3000)
    for count, p in zip(counts, [0.1, 0.2, 0.6, 0.1]):
        assert abs(count / 3000 - p) < 4 * math.sqrt(p * (1 - p) / 3000)


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        (dict(top_k=2), {1, 2}),
        (dict(top_p=0.7), {1, 2}),  # 0.6 alone is below 0.7; with 0.2 it reaches it
        (dict(top_p=0.5), {2}),
        (dict(min_p=0.3), {1, 2}),  # 0.3 * 0.6 = 0.18 keeps 0.2, drops 0.1
        (dict(min_p=0.5), {2}),
    ],
)
def test_filters_keep_only_allowed_tokens(kwargs, allowed):
    counts = draw(dict(temperature=1.0, **kwargs), [0.1, 0.2, 0.6, 0.1], 400)
    assert {i for i, c in enumerate(counts) if c} == allowed


def test_low_temperature_sharpens():
    counts = draw(dict(temperature=0.1), [0.1, 0.2, 0.6, 0.1], 200)
    assert counts[2] == 200


def test_logit_bias_bans_and_forces_tokens_and_leaves_logprobs_raw():
    probs = [0.1, 0.2, 0.6, 0.1]
    sampler = Sampler(4, [EOS])
    banned = sampler(logits_for(probs), [seq(SamplingParams(temperature=0, logit_bias={2: -100}))])[0]
    assert banned.token_id == 1
    forced = sampler(logits_for(probs), [seq(SamplingParams(temperature=0, logit_bias={0: 100}, logprobs=1))])[0]
    assert forced.token_id == 0 and forced.logprobs.logprob == pytest.approx(math.log(0.1), abs=1e-5)
    counts = draw(dict(temperature=1.0, logit_bias={2: -100, 3: -100}), probs, 300)
    assert counts[2] == counts[3] == 0 and counts[0] and counts[1]
    # Rows without a bias in the same batch are untouched.
    mixed = sampler(logits_for(probs).repeat(2, 1), [seq(SamplingParams(temperature=0, logit_bias={2: -100})),
                                                    seq(SamplingParams(temperature=0))])
    assert [r.token_id for r in mixed] == [1, 2]


@pytest.mark.parametrize("bias, message", [({-1: 1.0}, ">= 0"), ({1: float("nan")}, "finite"), ({1: 100.5}, "-100"),
                                           ({1: "x"}, "number")])
def test_bad_logit_bias_is_refused(bias, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_min_tokens_suppresses_eos_and_stop_tokens():
    probs = [0.01, 0.01, 0.01, 0.96, 0.01]
    params = dict(temperature=0, min_tokens=2, stop_token_ids=[4])
    sampler = Sampler(5, [EOS])
    early = sampler(logits_for(probs), [seq(SamplingParams(**params), output=[0])])[0].token_id
    late = sampler(logits_for(probs), [seq(SamplingParams(**params), output=[0, 0])])[0].token_id
    assert early != EOS and late == EOS


def test_penalties_push_away_repeated_tokens():
    probs = [0.05, 0.05, 0.5, 0.0, 0.4]
    sampler = Sampler(5, [EOS])
    greedy = dict(temperature=0)
    assert sampler(logits_for(probs), [seq(SamplingParams(**greedy), prompt=[0], output=[2])])[0].token_id == 2
    for penalty in (dict(frequency_penalty=1.0), dict(presence_penalty=1.0), dict(repetition_penalty=2.0)):
        out = sampler(logits_for(probs), [seq(SamplingParams(**greedy, **penalty), prompt=[0], output=[2])])
        assert out[0].token_id == 4, penalty
    # The repetition penalty also counts prompt tokens; frequency/presence do not.
    rep = sampler(logits_for(probs), [seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[2])])
    freq = sampler(logits_for(probs), [seq(SamplingParams(temperature=0, frequency_penalty=2.0), prompt=[2])])
    assert rep[0].token_id == 4 and freq[0].token_id == 2


def test_seeded_rows_do_not_depend_on_the_batch():
    probs = torch.softmax(torch.randn(1, 50, generator=torch.Generator().manual_seed(0)), -1)[0].tolist()
    sampler = Sampler(50, [EOS])
    mine = SamplingParams(temperature=1.0, seed=42)
    alone = sampler(logits_for(probs), [seq(mine)])[0].token_id
    others = [seq(SamplingParams(temperature=1.0)) for _ in range(5)]
    batch = sampler(logits_for(probs).repeat(6, 1), others[:3] + [seq(mine)] + others[3:])
    assert batch[3].token_id == alone
    different = {sampler(logits_for(probs), [seq(SamplingParams(temperature=1.0, seed=s))])[0].token_id for s in range(30)}
    assert len(different) > 5
    assert derive_seed(42, 0, 1) != derive_seed(42, 1, 0)


def test_logprobs_report_chosen_token_rank_and_top_alternatives():
    probs = [0.1, 0.2, 0.6, 0.1]
    out = Sampler(4, [EOS])(logits_for(probs), [seq(SamplingParams(temperature=0, logprobs=2))])[0]
    assert out.logprobs is not None
    assert out.logprobs.token_id == 2 and out.logprobs.rank == 1
    assert out.logprobs.logprob == pytest.approx(math.log(0.6), abs=1e-5)
    assert [t for t, _ in out.logprobs.top] == [2, 1]
    assert out.logprobs.top[1][1] == pytest.approx(math.log(0.2), abs=1e-5)
