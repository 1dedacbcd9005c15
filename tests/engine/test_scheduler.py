from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.engine.config import SchedulerConfig
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.scheduler import Scheduler, SchedulerOutput
from lmserve.engine.sequence import FinishReason, SequenceStatus

from .helpers import make_seq

EOS = 0


def make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, **kwargs):
    kv = KVCacheManager(num_blocks, block_size)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, **kwargs)
    return Scheduler(config, kv, max_model_len=1024, eos_token_ids=[EOS], clock=lambda: 0.0)


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
# Property: whatever happens, no block leaks and no live sequence can write a block another holds.


def check_invariants(sched: Scheduler, live: list) -> None:
    kv = sched.kv_cache
    held: dict[int, int] = {}
    for seq in live:
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
    assert set(s.seq_id for s in sched.running) == {
        s.seq_id for s in live if s.status is SequenceStatus.RUNNING
    }


events = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(0, 2)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events=events, num_blocks=st.integers(3, 24), budget=st.integers(1, 48))
def test_no_block_leaks_and_no_shared_writable_block(events, num_blocks, budget):
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget, max_num_seqs=6)
    live = []
    for event in events:
        if event[0] == "add":
            _, length, max_tokens, prefix = event
            # Prompts from a few shared prefixes, so the prefix cache is exercised.
            seq = make_seq(length, max_tokens=max_tokens, first_token=1 + prefix * 1000)
            if sched.kv_cache.num_blocks_needed(length + max_tokens) <= num_blocks:
                sched.add(seq)
                live.append(seq)
        elif event[0] == "step":
            run_step(sched, token=event[1] + 5)
        else:
            candidates = [s for s in live if not s.is_finished]
            if candidates:
                sched.abort(candidates[event[1] % len(candidates)])
        check_invariants(sched, live)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        run_step(sched)
        check_invariants(sched, live)
    assert not sched.has_unfinished()
    assert sched.kv_cache.num_free_blocks == num_blocks
    assert all(s.finish_reason is not None for s in live)
