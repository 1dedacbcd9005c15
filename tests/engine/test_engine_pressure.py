"""The engine when demand exceeds capacity, on the tiny random Llama: swap and recompute keep outputs
exact; priority, fairness, deadlines, timeouts, aborts and admission control behave as promised.

Time is an injected clock that moves one unit per step, so nothing here depends on machine speed.
"""

import random

import pytest

from lmserve import LLM, SamplingParams
from lmserve.engine.config import EngineConfig
from lmserve.engine.engine import Engine
from lmserve.engine.errors import EngineOverloaded
from lmserve.engine.sequence import FinishReason, SequenceStatus

from .helpers import FakeClock

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=1.0, seed=77, ignore_eos=True)
TINY_BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads, head_dim 16, fp32


def prompts(seed: int = 5, count: int = 12, low: int = 20, high: int = 90):
    rng = random.Random(seed)
    return [[rng.randrange(2, 512) for _ in range(rng.randint(low, high))] for _ in range(count)]


def outputs(llm, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts(), params, use_tqdm=False)]


@pytest.fixture(scope="module")
def unpressured(tiny_llama):
    llm = LLM(str(tiny_llama), num_blocks=256, enable_prefix_caching=False)
    return {"greedy": outputs(llm, GREEDY), "seeded": outputs(llm, SEEDED)}


@pytest.mark.parametrize(
    "setting, params",
    [
        ({"preemption_mode": "recompute"}, "greedy"),
        ({"preemption_mode": "swap"}, "greedy"),
        ({"preemption_mode": "swap"}, "seeded"),
        ({"preemption_mode": "swap", "swap_space_bytes": 3 * TINY_BLOCK_BYTES}, "greedy"),
    ],
    ids=["recompute", "swap", "swap-seeded", "swap-pool-full-falls-back"],
)
def test_outputs_under_memory_pressure_equal_those_without(tiny_llama, unpressured, setting, params):
    # 20 blocks of 16 tokens for 12 requests of up to 114 tokens: sequences must give way.
    llm = LLM(str(tiny_llama), num_blocks=20, max_num_batched_tokens=256, **setting)
    assert outputs(llm, GREEDY if params == "greedy" else SEEDED) == unpressured[params]
    stats = llm.engine.stats()
    if setting["preemption_mode"] == "recompute":
        assert stats.num_recompute_preemptions > 0 and stats.num_swap_preemptions == 0
    else:
        assert stats.num_swap_preemptions > 0 and stats.num_blocks_swapped_in == stats.num_blocks_swapped_out
    if "swap_space_bytes" in setting:
        assert stats.num_cpu_blocks == 3 and stats.num_recompute_preemptions > 0
    assert llm.engine.kv_cache.num_free_blocks == 20 and stats.cpu_kv_cache_usage == 0.0


def step_engine(tiny_llama, clock=None, **settings):
    clock = clock or FakeClock()
    engine = Engine(EngineConfig.from_kwargs(model=str(tiny_llama), **settings), clock=clock)
    return engine, clock


def run_steps(engine, clock, max_steps=10_000):
    """Steps until nothing is left; returns {request_id: (queue_time, finish step, finish reason)}."""
    seen = {}
    for step in range(1, max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            queue_time = seen.get(out.request_id, (None,))[0]
            seen[out.request_id] = (out.queue_time if queue_time is None else queue_time, step, out.finish_reason)
        clock.advance()
    return seen


def test_a_priority_0_request_overtakes_a_pool_full_of_priority_5_work(tiny_llama):
    engine, clock = step_engine(tiny_llama, num_blocks=24, max_num_seqs=8, scheduling_policy="priority")
    background = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(seed=9, count=8, low=40, high=40)):
        engine.add_request(f"low-{i}", prompt, background, priority=5)
    engine.step()
    clock.advance()
    assert engine.stats().kv_cache_usage == 1.0
    # Shorter than the work it overtakes, so "finishes first" measures the scheduling, not the length.
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.add_request("urgent", prompts(seed=10, count=1, low=30, high=30)[0], params, priority=0)
    arrived = clock()
    done = run_steps(engine, clock)
    queue_time, finished_at, reason = done["urgent"]
    assert queue_time <= 2 and reason is FinishReason.LENGTH
    assert all(finished_at < done[f"low-{i}"][1] for i in range(8))
    assert arrived == 1  # the clock counts steps
    assert engine.stats().num_preemptions > 0


def test_a_tenant_that_sends_a_little_is_not_starved_by_one_that_floods(tiny_llama):
    def mean_queue_time_of_b(policy):
        engine, clock = step_engine(tiny_llama, num_blocks=128, max_num_seqs=8, scheduling_policy=policy)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        rng = random.Random(3)
        for i in range(100):
            engine.add_request(f"a-{i}", [rng.randrange(2, 512) for _ in range(8)], params, tenant="a")
        engine.step()
        clock.advance()
        for i in range(5):
            engine.add_request(f"b-{i}", [rng.randrange(2, 512) for _ in range(8)], params, tenant="b")
        done = run_steps(engine, clock)
        assert len(done) == 105 and all(reason is FinishReason.LENGTH for _, _, reason in done.values())
        return sum(done[f"b-{i}"][0] for i in range(5)) / 5

    fcfs, fair = mean_queue_time_of_b("fcfs"), mean_queue_time_of_b("fair")
    assert fcfs > 20  # behind 100 requests, 8 at a time
    assert fair <= fcfs / 5


def test_queue_timeout_and_missed_deadline_end_requests_and_free_their_blocks(tiny_llama):
    engine, clock = step_engine(tiny_llama, num_blocks=64, max_num_seqs=1)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine.add_request("busy", list(range(2, 40)), params)
    engine.add_request("impatient", list(range(2, 20)), params, queue_timeout=3)
    engine.add_request("due", list(range(2, 20)), params, deadline=4.5)
    done = run_steps(engine, clock)
    assert done["busy"][2] is FinishReason.LENGTH
    assert done["impatient"] == (None, 4, FinishReason.TIMEOUT)  # reported in the step that ended it
    assert done["due"] == (None, 6, FinishReason.TIMEOUT)
    stats = engine.stats()
    assert stats.num_timeouts == 2 and stats.tenants[""].num_timeouts == 2
    assert engine.kv_cache.num_free_blocks == 64 and stats.num_queued_requests == 0


def test_abort_frees_everything_from_every_state(tiny_llama):
    engine, _ = step_engine(
        tiny_llama, num_blocks=12, max_num_batched_tokens=64, preemption_mode="swap", swap_space_bytes=2**20
    )
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    request_ids = [f"r{i}" for i in range(6)]
    for request_id, prompt in zip(request_ids, prompts(seed=11, count=6)):
        engine.add_request(request_id, prompt[:50], params)
    states = {}
    for _ in range(200):
        engine.step()
        for seq in engine.scheduler.live_sequences():
            state = seq.status.value
            if seq.status is SequenceStatus.RUNNING:
                state += "-prefill" if seq.num_uncomputed_tokens > 1 else "-decode"
            states.setdefault(state, seq.request_id)
        if len(states) == 4:
            break
    assert set(states) == {"waiting", "running-prefill", "running-decode", "swapped"}
    for request_id in states.values():
        engine.abort_request(request_id)
    for request_id in request_ids:
        engine.abort_request(request_id)
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_free_blocks == 12
    assert engine.kv_cache.num_free_cpu_blocks == engine.kv_cache.num_cpu_blocks
    assert engine.stats().num_queued_requests == 0


def test_overload_is_refused_at_once_and_loses_nothing_admitted(tiny_llama):
    engine, clock = step_engine(tiny_llama, num_blocks=64, max_num_seqs=2, max_queued_requests=3)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", [5, 6, 7, i + 2], params)
    with pytest.raises(EngineOverloaded) as refused:
        engine.add_request("extra", [5, 6, 7], params, tenant="t")
    assert refused.value.limit == "max_queued_requests"
    assert engine.stats().num_rejected == 1 and engine.stats().tenants["t"].num_rejected == 1
    tokens = {}
    for out in engine.step():  # two start: the queue has room again
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    clock.advance()
    engine.add_request("later", [5, 6, 7], params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        clock.advance()
    assert sorted(tokens) == ["later", "r0", "r1", "r2"]
    assert all(len(t) == 5 for t in tokens.values())
