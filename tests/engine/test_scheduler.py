import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.engine.config import SchedulerConfig
from lmserve.engine.errors import EngineOverloaded
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.scheduler import Scheduler, SchedulerOutput
from lmserve.engine.sequence import FinishReason, SequenceStatus

from .helpers import FakeClock, make_seq

EOS = 0


def make_scheduler(
    num_blocks=16, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, num_cpu_blocks=0, clock=None, **kwargs
):
    kv = KVCacheManager(num_blocks, block_size, num_cpu_blocks=num_cpu_blocks)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, **kwargs)
    return Scheduler(config, kv, max_model_len=1024, eos_token_ids=[EOS], clock=clock or FakeClock())


def run_step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedules a step and 'samples' `token` for every sequence that samples."""
    out = scheduler.schedule()
    scheduler.update(out, {s.seq.seq_id: token for s in out.scheduled if s.samples})
    return out


def shares(out: SchedulerOutput):
    return [(s.seq.seq_id, s.start, s.num_new_tokens) for s in out.scheduled]


def test_prefill_then_decode_one_token_per_step():
    sched = make_scheduler()
    seq = make_seq(10, max_tokens=3)
    sched.add(seq)
    out = run_step(sched)
    assert shares(out) == [(seq.seq_id, 0, 10)]
    assert out.scheduled[0].block_ids == [0, 1, 2]
    assert seq.num_computed_tokens == 10 and seq.output_token_ids == [7]
    out = run_step(sched)
    assert shares(out) == [(seq.seq_id, 10, 1)]
    run_step(sched)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.LENGTH
    assert seq.output_token_ids == [7, 7, 7]
    assert sched.kv_cache.num_free_blocks == 16 and not sched.has_unfinished()


def test_running_sequences_decode_before_waiting_ones_prefill_in_chunks():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_seq(3, max_tokens=10)
    b = make_seq(20, max_tokens=10)
    sched.add(a)
    sched.add(b)
    assert shares(run_step(sched)) == [(a.seq_id, 0, 3), (b.seq_id, 0, 5)]
    assert b.output_token_ids == []  # mid-prefill: nothing sampled
    assert shares(run_step(sched)) == [(a.seq_id, 3, 1), (b.seq_id, 5, 7)]
    assert shares(run_step(sched)) == [(a.seq_id, 4, 1), (b.seq_id, 12, 7)]
    out = run_step(sched)
    assert shares(out) == [(a.seq_id, 5, 1), (b.seq_id, 19, 1)]
    assert out.scheduled[1].samples and b.output_token_ids == [7]


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_that_holds_it():
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    a, b = make_seq(3, max_tokens=2), make_seq(6, max_tokens=2)
    sched.add(a)
    sched.add(b)
    assert shares(run_step(sched)) == [(a.seq_id, 0, 3)]
    assert shares(run_step(sched)) == [(a.seq_id, 3, 1), (b.seq_id, 0, 6)]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert [s.seq.seq_id for s in out.scheduled] == [seqs[0].seq_id, seqs[1].seq_id]
    assert sched.num_waiting == 1


def test_preemption_frees_the_last_admitted_and_recomputes_it_with_its_output():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=64)
    a, b = make_seq(4, max_tokens=4), make_seq(3, max_tokens=4, first_token=40)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: blocks 0,1 (4 tokens); b: blocks 2,3 (3 tokens) -> pool full
    assert sched.kv_cache.block_ids(a) == [0, 1] and sched.kv_cache.block_ids(b) == [2, 3]
    # a has 5 tokens now and needs a third block: b is preempted.
    out = run_step(sched, token=8)
    assert out.preempted == [b] and shares(out) == [(a.seq_id, 4, 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.token_ids == [40, 41, 42, 7] and sched.kv_cache.block_ids(b) == []
    assert sched.stats.num_preemptions == 1 and b.num_preemptions == 1
    # No admission in a step that preempted; next step b cannot fit until a finishes.
    out = run_step(sched)
    assert shares(out) == [(a.seq_id, 5, 1)]
    run_step(sched)  # a's 4th token -> finished
    assert a.finish_reason is FinishReason.LENGTH
    out = run_step(sched)
    # b recomputes prompt + its output; block 1 of its own history ([40,41]) was cached and evicted or not.
    assert out.scheduled[0].seq is b and out.scheduled[0].start + out.scheduled[0].num_new_tokens == 4
    assert b.output_token_ids == [7, 7]


def test_a_sequence_that_cannot_fit_alone_finishes_with_length():
    sched = make_scheduler(num_blocks=2, block_size=2)
    seq = make_seq(4, max_tokens=10)
    sched.add(seq)
    run_step(sched)
    out = run_step(sched)
    assert out.finished == [seq] and seq.finish_reason is FinishReason.LENGTH
    assert seq.output_token_ids == [7] and sched.kv_cache.num_free_blocks == 2


def test_eos_and_stop_tokens_finish_unless_ignored_or_below_min_tokens():
    sched = make_scheduler()
    eos = make_seq(2, params=SamplingParams(max_tokens=5))
    ignore = make_seq(2, params=SamplingParams(max_tokens=2, ignore_eos=True))
    stop = make_seq(2, params=SamplingParams(max_tokens=5, stop_token_ids=[9], min_tokens=2))
    for s in (eos, ignore, stop):
        sched.add(s)
    out = sched.schedule()
    sched.update(out, {eos.seq_id: EOS, ignore.seq_id: EOS, stop.seq_id: 9})
    assert eos.finish_reason is FinishReason.STOP and eos.output_token_ids == [EOS]
    assert not ignore.is_finished and not stop.is_finished  # stop token before min_tokens
    out = sched.schedule()
    sched.update(out, {ignore.seq_id: EOS, stop.seq_id: 9})
    assert ignore.finish_reason is FinishReason.LENGTH
    assert stop.finish_reason is FinishReason.STOP


def test_abort_in_every_state_frees_everything():
    sched = make_scheduler(max_num_batched_tokens=8)
    running, prefilling, waiting = make_seq(2), make_seq(20), make_seq(3)
    for s in (running, prefilling, waiting):
        sched.add(s)
    run_step(sched)  # running decodes next; prefilling got 6 of 20 tokens; waiting still waits
    assert prefilling.num_computed_tokens == 6 and waiting.status is SequenceStatus.WAITING
    for s in (waiting, prefilling, running):
        sched.abort(s)
        assert s.finish_reason is FinishReason.ABORT
    assert sched.kv_cache.num_free_blocks == 16 and not sched.has_unfinished()


def test_abort_during_a_step_is_ignored_by_update():
    sched = make_scheduler()
    seq = make_seq(4)
    sched.add(seq)
    out = sched.schedule()
    sched.abort(seq)
    assert sched.update(out, {seq.seq_id: 7}) == []
    assert seq.output_token_ids == [] and sched.kv_cache.num_free_blocks == 16


def test_second_request_with_same_prefix_computes_only_uncached_tokens():
    sched = make_scheduler(num_blocks=32, block_size=4)
    first = make_seq(17, max_tokens=1)
    sched.add(first)
    run_step(sched)
    second = make_seq(19, max_tokens=1)  # same 17 tokens, 2 more
    sched.add(second)
    out = run_step(sched)
    assert shares(out) == [(second.seq_id, 16, 3)]
    assert second.num_cached_tokens == 16


# ---------------------------------------------------------------------------------------------
# Swap preemption: the scheduler decides, the runner copies the block pairs it names.


def test_swap_moves_the_victims_computed_blocks_to_cpu_and_back():
    sched = make_scheduler(num_blocks=4, block_size=2, num_cpu_blocks=3, preemption_mode="swap")
    a, b = make_seq(4, max_tokens=4), make_seq(3, max_tokens=4, first_token=40)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: blocks 0,1; b: blocks 2,3 -> pool full
    out = run_step(sched, token=8)  # a needs a third block: b (latest arrival) is swapped out
    assert out.preempted == [b] and out.swap_out == [(2, 0), (3, 1)] and out.swap_in == []
    assert b.status is SequenceStatus.SWAPPED and b.num_computed_tokens == 3
    assert sched.kv_cache.block_ids(b) == [] and sched.kv_cache.cpu_block_ids(b) == [0, 1]
    assert sched.kv_cache.block_ids(a) == [0, 1, 3] and shares(out) == [(a.seq_id, 4, 1)]
    assert sched.num_swapped == 1 and sched.stats.num_swap_preemptions == 1
    assert sched.stats.num_recompute_preemptions == 0
    run_step(sched)
    run_step(sched)  # a's 4th token: finished
    assert a.finish_reason is FinishReason.LENGTH
    out = run_step(sched)
    # b resumes where it was: blocks restored, only its newest token is computed.
    assert out.swap_in == [(0, 2), (1, 3)] and shares(out) == [(b.seq_id, 3, 1)]
    assert sched.kv_cache.block_ids(b) == [2, 3] and b.status is SequenceStatus.RUNNING
    assert sched.kv_cache.num_free_cpu_blocks == 3 and sched.stats.num_blocks_swapped_in == 2


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full():
    sched = make_scheduler(num_blocks=4, block_size=2, num_cpu_blocks=1, preemption_mode="swap")
    a, b = make_seq(4, max_tokens=4), make_seq(3, max_tokens=4, first_token=40)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    out = run_step(sched)
    assert out.preempted == [b] and out.swap_out == []  # b needs 2 CPU blocks, 1 exists
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert sched.stats.num_recompute_preemptions == 1 and sched.stats.num_swap_preemptions == 0


# ---------------------------------------------------------------------------------------------
# Policies: priority, fair, deadline; queue timeouts; admission control.


def test_priority_orders_the_queue_and_preempts_the_lowest_priority_first():
    sched = make_scheduler(num_blocks=7, block_size=2, scheduling_policy="priority")
    low, high = make_seq(4, max_tokens=8, priority=5), make_seq(4, max_tokens=8, priority=1, first_token=20)
    sched.add(low)
    sched.add(high)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [high, low]  # high arrived later, starts first
    run_step(sched)
    run_step(sched)
    out = run_step(sched)  # both need a fourth block, one is free: low gives way
    assert out.preempted == [low] and high.status is SequenceStatus.RUNNING


def test_a_priority_0_request_starts_within_two_steps_and_finishes_before_the_priority_5_work():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=4, scheduling_policy="priority")
    background = [make_seq(8, max_tokens=20, priority=5, first_token=100 * i) for i in range(4)]
    for seq in background:
        sched.add(seq)
    run_step(sched)
    assert sched.kv_cache.num_free_blocks == 0 and sched.num_running == 4
    urgent = make_seq(4, max_tokens=4, priority=0, first_token=900)
    sched.add(urgent)
    finished_at = {}
    for step in range(1, 200):
        run_step(sched)
        if step <= 2 and urgent.status is SequenceStatus.RUNNING:
            started = step
        for seq in [urgent, *background]:
            if seq.is_finished and seq.seq_id not in finished_at:
                finished_at[seq.seq_id] = step
        if not sched.has_unfinished():
            break
    assert started <= 2
    assert all(finished_at[urgent.seq_id] < finished_at[s.seq_id] for s in background)
    assert all(s.finish_reason is FinishReason.LENGTH for s in [urgent, *background])


def test_fcfs_never_preempts_running_work_for_a_queued_request():
    sched = make_scheduler(max_num_seqs=1)
    first, second = make_seq(4, max_tokens=3, priority=5), make_seq(4, max_tokens=3, priority=0)
    sched.add(first)
    run_step(sched)
    sched.add(second)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [first] and out.preempted == []


def test_fair_interleaves_tenants_by_tokens_served():
    sched = make_scheduler(num_blocks=64, max_num_seqs=1, scheduling_policy="fair")
    flood = [make_seq(4, max_tokens=1, tenant="a") for _ in range(6)]
    for seq in flood:
        sched.add(seq)
    run_step(sched)  # a's first request runs; a has been served its 4 prompt tokens (+1)
    small = [make_seq(4, max_tokens=1, tenant="b", first_token=50) for _ in range(2)]
    for seq in small:
        sched.add(seq)
    order = []
    while sched.has_unfinished():
        out = run_step(sched)
        order += [s.seq.tenant for s in out.scheduled]
    # b starts at a's counter (it cannot have banked credit while idle); the tie goes to the earlier
    # arrival, then each start puts its tenant behind the other.
    assert order[:6] == ["a", "b", "a", "b", "a", "a"]


def test_fair_weights_give_a_tenant_a_larger_share():
    sched = make_scheduler(num_blocks=64, max_num_seqs=1, scheduling_policy="fair", tenant_weights={"a": 3.0})
    for tenant in ("a", "b"):
        for _ in range(8):
            sched.add(make_seq(4, max_tokens=1, tenant=tenant))
    order = []
    while sched.has_unfinished():
        order += [s.seq.tenant for s in run_step(sched).scheduled]
    assert order[:8].count("a") == 6


def test_deadline_policy_runs_earliest_deadline_first():
    clock = FakeClock()
    sched = make_scheduler(max_num_seqs=1, scheduling_policy="deadline", clock=clock)
    late, soon = make_seq(4, max_tokens=1, deadline=50.0), make_seq(4, max_tokens=1, deadline=10.0)
    none = make_seq(4, max_tokens=1)
    for seq in (none, late, soon):
        sched.add(seq)
    order = []
    while sched.has_unfinished():
        order += [s.seq for s in run_step(sched).scheduled]
        clock.advance()
    assert order == [soon, late, none]


def test_deadline_policy_ends_a_request_that_can_no_longer_make_it():
    clock = FakeClock()
    sched = make_scheduler(num_blocks=64, max_num_batched_tokens=16, scheduling_policy="deadline", clock=clock)
    for num_tokens in (4, 16, 8):
        sched.record_step(num_tokens, 0.1 + 0.01 * num_tokens)  # measured: 0.1 s a step + 10 ms a token
    # 40 tokens at 16 a step: 3 steps -> 0.3 s + 0.4 s = 0.7 s until the first token.
    doomed = make_seq(40, max_tokens=2, deadline=0.5)
    feasible = make_seq(40, max_tokens=2, deadline=0.8, first_token=100)
    sched.add(doomed)
    sched.add(feasible)
    out = run_step(sched)
    assert out.finished == [doomed] and doomed.finish_reason is FinishReason.TIMEOUT
    assert [s.seq for s in out.scheduled] == [feasible]
    assert sched.kv_cache.block_ids(doomed) == [] and sched.stats.num_timeouts == 1


def test_deadline_policy_counts_the_work_lined_up_before_a_request():
    clock = FakeClock()
    sched = make_scheduler(num_blocks=64, max_num_batched_tokens=16, scheduling_policy="deadline", clock=clock)
    sched.record_step(16, 0.1)  # 0.1 s for 16 tokens, no fixed part measured yet
    first = make_seq(16, max_tokens=1, deadline=0.15)
    second = make_seq(16, max_tokens=1, deadline=0.19, first_token=100)  # alone 0.1 s; behind first 0.2 s
    third = make_seq(16, max_tokens=1, deadline=0.25, first_token=200)
    for seq in (first, second, third):
        sched.add(seq)
    out = run_step(sched)
    assert out.finished == [second] and [s.seq for s in out.scheduled] == [first]


def test_deadline_policy_counts_the_wait_for_a_sequence_slot():
    clock = FakeClock()
    sched = make_scheduler(num_blocks=64, max_num_seqs=1, scheduling_policy="deadline", clock=clock)
    sched.record_step(10, 1.0)  # 0.1 s a token
    busy = make_seq(4, max_tokens=21)
    sched.add(busy)
    run_step(sched)  # busy holds the only slot for 20 more decode steps of 0.1 s
    doomed = make_seq(4, max_tokens=1, deadline=1.0, first_token=100)
    patient = make_seq(4, max_tokens=1, deadline=3.0, first_token=200)
    sched.add(doomed)
    sched.add(patient)
    out = run_step(sched)
    assert out.finished == [doomed] and doomed.finish_reason is FinishReason.TIMEOUT
    assert patient.status is SequenceStatus.WAITING


def test_without_measurements_the_deadline_policy_gives_up_on_no_one():
    sched = make_scheduler(scheduling_policy="deadline")
    seq = make_seq(40, max_tokens=1, deadline=0.001)
    sched.add(seq)
    assert run_step(sched).finished == [] and seq.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair", "deadline"])
def test_a_missed_deadline_ends_the_request_in_every_policy(policy):
    clock = FakeClock()
    # One sequence slot: `waiting` stays queued behind `prefilling`.
    sched = make_scheduler(max_num_batched_tokens=8, max_num_seqs=1, scheduling_policy=policy, clock=clock)
    prefilling = make_seq(20, max_tokens=4, deadline=2.0, first_token=100)
    waiting = make_seq(4, max_tokens=4, deadline=2.0)
    sched.add(prefilling)
    sched.add(waiting)
    run_step(sched)
    assert prefilling.num_computed_tokens == 8 and waiting.status is SequenceStatus.WAITING
    clock.advance(3.0)
    out = run_step(sched)
    assert set(out.finished) == {waiting, prefilling} and out.scheduled == []
    assert all(s.finish_reason is FinishReason.TIMEOUT for s in (waiting, prefilling))
    assert sched.kv_cache.num_free_blocks == 16 and not sched.has_unfinished()


def test_queue_timeout_ends_only_requests_that_never_started():
    clock = FakeClock()
    sched = make_scheduler(max_num_seqs=1, clock=clock)
    running = make_seq(4, max_tokens=10, queue_timeout=1.0)
    queued = make_seq(4, max_tokens=10, queue_timeout=1.0)
    sched.add(running)
    sched.add(queued)
    run_step(sched)
    clock.advance(1.0)
    out = run_step(sched)
    assert out.finished == [queued] and queued.finish_reason is FinishReason.TIMEOUT
    assert running.status is SequenceStatus.RUNNING
    assert sched.admission.num_queued_requests == 0 and sched.stats.tenants[""].num_timeouts == 1


def test_abort_in_every_state_including_swapped_frees_everything():
    sched = make_scheduler(num_blocks=4, block_size=2, num_cpu_blocks=4, preemption_mode="swap")
    a, b = make_seq(4, max_tokens=8), make_seq(3, max_tokens=8, first_token=40)
    waiting = make_seq(2, first_token=60)
    for seq in (a, b, waiting):
        sched.add(seq)
    run_step(sched)
    run_step(sched)
    assert b.status is SequenceStatus.SWAPPED and waiting.status is SequenceStatus.WAITING
    for seq in (b, waiting, a):
        sched.abort(seq)
        assert seq.finish_reason is FinishReason.ABORT
        assert sched.kv_cache.block_ids(seq) == [] and sched.kv_cache.cpu_block_ids(seq) == []
    assert sched.kv_cache.num_free_blocks == 4 and sched.kv_cache.num_free_cpu_blocks == 4
    assert not sched.has_unfinished() and sched.admission.num_queued_requests == 0


def test_admission_control_refuses_beyond_the_limits_and_keeps_what_it_admitted():
    clock = FakeClock()
    sched = make_scheduler(max_num_seqs=1, max_queued_requests=2, max_queued_tokens=10, clock=clock)
    first, second = make_seq(4, max_tokens=2), make_seq(4, max_tokens=2)
    for seq in (first, second):
        sched.check_admission("t", seq.num_prompt_tokens)
        sched.add(seq)
    with pytest.raises(EngineOverloaded) as refused:
        sched.check_admission("t", 1)
    assert refused.value.limit == "max_queued_requests" and refused.value.retry_after is None
    run_step(sched)  # first starts: one place frees
    with pytest.raises(EngineOverloaded, match="max_queued_tokens=10") as refused:
        sched.check_admission("t", 7)
    assert refused.value.limit == "max_queued_tokens"
    sched.check_admission("t", 6)
    with pytest.raises(ValueError, match="more than max_queued_tokens"):
        sched.check_admission("t", 11)
    assert sched.stats.num_rejected == 2 and sched.stats.tenants["t"].num_rejected == 2
    while sched.has_unfinished():
        run_step(sched)
        clock.advance(0.5)
    assert first.finish_reason is second.finish_reason is FinishReason.LENGTH


def test_retry_after_comes_from_the_rate_requests_start():
    clock = FakeClock()
    sched = make_scheduler(max_num_seqs=1, max_queued_requests=2, clock=clock)
    for _ in range(4):
        sched.add(make_seq(2, max_tokens=1))
    for _ in range(3):  # one request starts every 2 seconds
        run_step(sched)
        clock.advance(2.0)
    # 3 starts in the 6 s since the first: 0.5 a second. Two wait now; one more start makes room.
    sched.add(make_seq(2, max_tokens=1))
    with pytest.raises(EngineOverloaded) as refused:
        sched.check_admission("", 2)
    assert refused.value.retry_after == pytest.approx(1 / 0.5)


def test_stats_bound_the_tenant_labels():
    sched = make_scheduler(max_tenant_labels=2)
    for tenant in ("a", "b", "c", "d"):
        sched.add(make_seq(2, max_tokens=1, tenant=tenant))
    run_step(sched)
    assert set(sched.stats.tenants) == {"a", "b", "other"}
    assert sched.stats.tenants["other"].num_started == 2
    snapshot = sched.stats.tenant_snapshot(sched.live_sequences())
    assert sum(t.num_running + t.num_waiting for t in snapshot.values()) == 0  # all finished


# ---------------------------------------------------------------------------------------------
# Property: whatever happens, no block leaks and no live sequence can write a block another holds.


def check_invariants(sched: Scheduler, live: list) -> None:
    kv = sched.kv_cache
    held: dict[int, int] = {}
    cpu_held: list[int] = []
    for seq in live:
        cpu_ids = kv.cpu_block_ids(seq)
        if seq.status is SequenceStatus.SWAPPED:
            assert kv.block_ids(seq) == []
            assert len(cpu_ids) == kv.num_blocks_needed(seq.num_computed_tokens) > 0
            cpu_held += cpu_ids
            continue
        assert cpu_ids == []
        if seq.is_finished or seq.status is SequenceStatus.WAITING:
            assert kv.block_ids(seq) == []
            continue
        table = kv.blocks(seq)
        assert len(table) * kv.block_size >= seq.num_computed_tokens
        for block in table:
            held[block.block_id] = held.get(block.block_id, 0) + 1
        # Blocks this sequence will write (from its first uncomputed token on) are its alone.
        for block in table[seq.num_computed_tokens // kv.block_size :]:
            assert block.ref_count == 1
    for block in kv.pool.blocks:
        assert block.ref_count == held.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in kv.pool.free_queue)
    assert kv.num_free_blocks + len(held) == kv.num_blocks
    assert len(set(cpu_held)) == len(cpu_held)
    assert kv.num_free_cpu_blocks + len(cpu_held) == kv.num_cpu_blocks
    for queue, status in ((sched.running, SequenceStatus.RUNNING), (sched.swapped, SequenceStatus.SWAPPED),
                          (sched.waiting, SequenceStatus.WAITING)):
        assert {s.seq_id for s in queue} == {s.seq_id for s in live if s.status is status}
        assert len(queue) == len({s.seq_id for s in queue})
    never_started = [s for s in live if not s.is_finished and s.first_scheduled_time is None]
    assert sched.admission.num_queued_requests == len(never_started)
    assert sched.admission.num_queued_tokens == sum(s.num_prompt_tokens for s in never_started)


LIVE_STATES = [SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.SWAPPED]

events = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(1, 24),  # prompt length
            st.integers(1, 24),  # max tokens
            st.integers(0, 3),  # shared prefix
            st.integers(0, 3),  # priority
            st.sampled_from(["", "a", "b"]),  # tenant
            st.none() | st.floats(0.0, 12.0),  # deadline, steps from now
            st.none() | st.floats(0.5, 12.0),  # queue timeout, steps
            st.integers(1, 4),  # how many such requests arrive at once
        ),
        st.tuples(st.just("step"), st.integers(0, 2)),
        # Abort a sequence, preferably one in the given state.
        st.tuples(st.just("abort"), st.integers(0, 50), st.sampled_from(LIVE_STATES)),
    ),
    min_size=1,
    max_size=40,
)


def step_and_tick(sched: Scheduler, clock: FakeClock, token: int = 7) -> None:
    """One step that takes 0.1 s plus 10 ms a token on the fake clock, as the engine would report it."""
    out = run_step(sched, token)
    seconds = 0.1 + 0.01 * out.num_batched_tokens
    sched.record_step(out.num_batched_tokens, seconds)
    clock.advance(seconds)


@settings(max_examples=300, deadline=None)
@given(
    events=events,
    num_blocks=st.integers(3, 16),
    budget=st.integers(1, 48),
    policy=st.sampled_from(["fcfs", "priority", "fair", "deadline"]),
    preemption_mode=st.sampled_from(["recompute", "swap"]),
    num_cpu_blocks=st.integers(0, 24),
)
def test_no_block_leaks_and_no_shared_writable_block(
    events, num_blocks, budget, policy, preemption_mode, num_cpu_blocks
):
    clock = FakeClock()
    sched = make_scheduler(
        num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget, max_num_seqs=6,
        scheduling_policy=policy, preemption_mode=preemption_mode, num_cpu_blocks=num_cpu_blocks,
        tenant_weights={"a": 2.0}, clock=clock,
    )
    live = []
    for event in events:
        if event[0] == "add":
            _, length, max_tokens, prefix, priority, tenant, deadline, queue_timeout, count = event
            if sched.kv_cache.num_blocks_needed(length + max_tokens) > num_blocks:
                continue
            for _ in range(count):
                # Prompts from a few shared prefixes, so the prefix cache is exercised.
                seq = make_seq(
                    length, max_tokens=max_tokens, first_token=1 + prefix * 1000, priority=priority,
                    tenant=tenant, deadline=None if deadline is None else clock.now + deadline * 0.3,
                    queue_timeout=None if queue_timeout is None else clock.now + queue_timeout * 0.3,
                )
                seq.arrival_time = clock.now
                sched.add(seq)
                live.append(seq)
        elif event[0] == "step":
            step_and_tick(sched, clock, token=event[1] + 5)
        else:
            _, index, status = event
            candidates = [s for s in live if s.status is status] or [s for s in live if not s.is_finished]
            if candidates:
                sched.abort(candidates[index % len(candidates)])
        check_invariants(sched, live)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        step_and_tick(sched, clock)
        check_invariants(sched, live)
    assert not sched.has_unfinished()
    assert sched.kv_cache.num_free_blocks == num_blocks
    assert sched.kv_cache.num_free_cpu_blocks == num_cpu_blocks
    assert all(s.finish_reason is not None for s in live)
    assert sched.admission.num_queued_requests == 0 and sched.admission.num_queued_tokens == 0
