import pytest

from lmserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(max_tokens=2.5), "max_tokens must be an integer"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens .* must not be greater"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be >= -1"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
        (dict(presence_penalty=3), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty="1"), "frequency_penalty must be a number"),
        (dict(n=0), "n must be >= 1"),
        (dict(logprobs=21), "logprobs must be at most 20"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be >= 0"),
        (dict(stop=[""]), "stop must be a list of non-empty strings"),
        (dict(seed=True), "seed must be an integer"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_normalisation():
    p = SamplingParams(top_k=-1, stop="x", temperature=0)
    assert p.top_k == 0 and p.stop == ["x"] and p.is_greedy and not p.has_penalties
    assert SamplingParams(presence_penalty=0.5).has_penalties
