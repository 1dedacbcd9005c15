import pytest

from lmserve.engine.estimators import PrefillLine, RateMeter, StepCostModel

from .helpers import make_seq


def test_step_cost_model_recovers_fixed_and_per_token_cost():
    model = StepCostModel()
    assert model.coefficients() is None and model.seconds_to_compute(100, 0, 64) is None
    for num_tokens in (1, 64, 8, 32, 1, 64):
        model.observe(num_tokens, 0.02 + 0.001 * num_tokens)
    fixed, per_token = model.coefficients()
    assert fixed == pytest.approx(0.02) and per_token == pytest.approx(0.001)
    # 100 prefill tokens, 4 decodes riding along, 64 a step: 2 steps of 60 prefill + 4 decode tokens.
    assert model.seconds_to_compute(100, 4, 64) == pytest.approx(2 * 0.02 + (100 + 8) * 0.001)


def test_step_cost_model_with_one_step_size_uses_the_plain_ratio():
    model = StepCostModel()
    model.observe(10, 0.5)
    model.observe(10, 0.5)
    assert model.coefficients() == pytest.approx((0.0, 0.05))


def test_step_cost_model_ignores_steps_it_cannot_learn_from():
    model = StepCostModel()
    model.observe(0, 1.0)
    model.observe(5, 0.0)
    assert model.coefficients() is None


def test_step_cost_model_follows_a_machine_that_slows_down():
    model = StepCostModel(decay=0.5)
    for _ in range(5):
        model.observe(10, 0.1)
    for _ in range(20):
        model.observe(10, 0.4)
    assert model.seconds_to_compute(10, 0, 10) == pytest.approx(0.4, rel=1e-3)


def test_rate_meter_counts_events_until_now():
    meter = RateMeter(window=3)
    meter.record(0.0)
    assert meter.rate(1.0) is None
    for t in (1.0, 2.0, 3.0):
        meter.record(t)
    assert meter.rate(4.0) == pytest.approx(3 / 3.0)  # window keeps 1, 2, 3
    assert meter.rate(13.0) == pytest.approx(3 / 12.0)  # nothing since: the rate falls


def test_prefill_line_adds_up_the_work_ahead():
    model = StepCostModel()
    model.observe(10, 1.0)
    line = PrefillLine(model, budget=10, num_decodes=0, tokens_to_compute=lambda s: s.num_tokens, num_tokens_ahead=5)
    seq = make_seq(15)
    assert line.seconds_until_first_token(seq) == pytest.approx(2.0)
    line.append(seq)
    assert line.seconds_until_first_token(make_seq(10)) == pytest.approx(3.0)


def test_prefill_line_waits_for_a_sequence_slot_when_all_are_taken():
    model = StepCostModel()
    model.observe(10, 1.0)  # 0.1 s a token, no fixed part
    line = PrefillLine(
        model, budget=10, num_decodes=2, tokens_to_compute=lambda s: s.num_tokens,
        num_free_seats=1, seat_free_steps=[7, 3],
    )
    first, second, third, fourth = (make_seq(4) for _ in range(4))
    assert line.seconds_until_first_token(first) == pytest.approx(0.6)  # a slot is free: 4 + 2 tokens
    line.append(first)
    # The next slot frees in 3 decode steps of 2 tokens (0.6 s), then its own prefill step (0.6 s).
    assert line.seconds_until_first_token(second) == pytest.approx(1.2)
    line.append(second)
    assert line.seconds_until_first_token(third) == pytest.approx(7 * 0.2 + 0.6)
    line.append(third)
    assert line.seconds_until_first_token(fourth) == pytest.approx(7 * 0.2 + 0.6)  # the last slot known
