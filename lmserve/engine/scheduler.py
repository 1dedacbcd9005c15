"""Decides, each step, which sequences run and how many of their tokens. Pure Python.

There is one token budget per step and no separate prefill or decode phase: a sequence needs
`num_tokens - num_computed_tokens` more tokens computed, which is 1 while it decodes and more
while its prompt (or, after preemption, its whole history) is being computed, in chunks when the
budget runs out. A policy (`lmserve.engine.policies`) orders the queue and picks whom to preempt.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lmserve.engine.admission import AdmissionControl
from lmserve.engine.config import PreemptionMode, SchedulerConfig
from lmserve.engine.errors import EngineOverloaded
from lmserve.engine.estimators import PrefillLine, StepCostModel
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.policies import Rank, SchedulingPolicy, make_policy
from lmserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from lmserve.engine.stats import SchedulerStats


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: tokens `[start, start + num_new_tokens)` are computed."""

    seq: Sequence
    start: int
    num_new_tokens: int
    block_ids: list[int]
    samples: bool = field(init=False)
    """True when this step computes the sequence's last known token, so a new one is sampled."""

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's decisions. The runner copies `swap_out` pairs, then `swap_in` pairs, then runs
    the forward pass: a device block freed by a swap-out may be the target of a swap-in or of
    this step's new KV entries, so it must be read first."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    """Sequences that ended while being scheduled (could not fit at all, timed out)."""
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    """(device block, CPU block) pairs to copy to the CPU pool."""
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    """(CPU block, device block) pairs to copy back to the device."""
    num_batched_tokens: int = 0

    def add(self, scheduled: ScheduledSequence) -> None:
        self.scheduled.append(scheduled)
        self.num_batched_tokens += scheduled.num_new_tokens

    def remove(self, seq: Sequence) -> None:
        """Takes back `seq`'s share of the step, if it has one."""
        for i, scheduled in enumerate(self.scheduled):
            if scheduled.seq is seq:
                del self.scheduled[i]
                self.num_batched_tokens -= scheduled.num_new_tokens
                return

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class _Start(enum.Enum):
    STARTED = "started"
    NO_BUDGET = "no_budget"
    """What is left of the token budget cannot hold the sequence's tokens (chunking is off)."""
    NO_ROOM = "no_room"
    """No free blocks or sequence slot: preempting someone would make room."""


class Scheduler:
    """Owns the waiting queue, the running list and the swapped list.

    Invariants: every RUNNING sequence is in `running` and holds device blocks; every SWAPPED
    sequence is in `swapped` and holds CPU blocks only; every WAITING sequence is in `waiting` and
    holds none; FINISHED sequences are in none of them and hold nothing.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
        policy: SchedulingPolicy | None = None,
    ) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.clock = clock
        self.policy = policy or make_policy(config)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.stats = SchedulerStats(max_tenant_labels=config.max_tenant_labels)
        self.step_cost = StepCostModel()
        self.admission = AdmissionControl(config.max_queued_requests, config.max_queued_tokens)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def live_sequences(self) -> list[Sequence]:
        return [*self.running, *self.swapped, *self.waiting]

    def check_admission(self, tenant: str, num_prompt_tokens: int) -> None:
        """Raises EngineOverloaded, changing nothing, when a request would overfill the queue."""
        try:
            self.admission.check(num_prompt_tokens, self.clock())
        except EngineOverloaded:
            self.stats.record_rejection(tenant)
            raise

    def add(self, seq: Sequence) -> None:
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id} is not a new waiting sequence")
        self.waiting.append(seq)
        self.policy.on_add(seq)
        self.stats.record_add(seq)
        self.admission.enqueue(seq)

    def abort(self, seq: Sequence, reason: FinishReason = FinishReason.ABORT) -> None:
        """Ends a sequence in any state and frees everything it held, at once."""
        if seq.is_finished:
            return
        self._queue_of(seq).remove(seq)
        self._finish(seq, reason)

    def record_step(self, num_tokens: int, seconds: float) -> None:
        """Teaches the step cost model how long a step of `num_tokens` took."""
        self.step_cost.observe(num_tokens, seconds)

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        output = SchedulerOutput()
        self._end_expired(output, now)
        queued = self.policy.order(itertools.chain(self.swapped, self.waiting))
        queued = self._end_hopeless(queued, output, now)
        # Sorted, the running sequence to give way first is always the last one.
        self.running.sort(key=self.policy.rank)
        self._schedule_running(output)
        # After a preemption the pool is short: starting what would be preempted next only thrashes.
        rank_limit = min((self.policy.rank(s) for s in output.preempted), default=None)
        self._schedule_queued(output, queued, rank_limit, now)
        self.kv_cache.release_swapped_in()
        return output

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[int, int]) -> list[Sequence]:
        """Applies a finished step: advances computed tokens, appends sampled tokens, ends sequences.

        Returns the sequences that received a token, in schedule order.
        """
        received = []
        now = self.clock()
        for scheduled in output.scheduled:
            seq = scheduled.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens = scheduled.start + scheduled.num_new_tokens
            self.kv_cache.cache_blocks(seq)
            token_id = sampled_token_ids.get(seq.seq_id)
            if token_id is None:
                continue
            seq.token_ids.append(token_id)
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.policy.on_served(seq, 1)
            self.stats.record_token(seq)
            received.append(seq)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
        return received

    def _end_expired(self, output: SchedulerOutput, now: float) -> None:
        """Ends sequences past their queue timeout (never started) or their first-token deadline."""
        for seq in [s for s in self.live_sequences() if _is_expired(s, now)]:
            self.abort(seq, FinishReason.TIMEOUT)
            output.finished.append(seq)

    def _end_hopeless(self, queued: list[Sequence], output: SchedulerOutput, now: float) -> list[Sequence]:
        """Ends the queued sequences the policy gives up on; returns the others, in order."""
        hopeless = self.policy.find_hopeless(queued, now, self._prefill_line)
        if not hopeless:
            return queued
        for seq in hopeless:
            self.abort(seq, FinishReason.TIMEOUT)
            output.finished.append(seq)
        return [s for s in queued if not s.is_finished]

    def _prefill_line(self) -> PrefillLine:
        """The line queued sequences would join now: prefills still owed and slots still taken."""
        mid_prefill = [s for s in self.running if s.num_uncomputed_tokens > 1]
        return PrefillLine(
            self.step_cost,
            self.config.max_num_batched_tokens,
            num_decodes=len(self.running) - len(mid_prefill),
            tokens_to_compute=self._tokens_to_compute,
            num_tokens_ahead=sum(s.num_uncomputed_tokens for s in mid_prefill),
            num_free_seats=self.config.max_num_seqs - len(self.running),
            seat_free_steps=[self._max_steps_left(s) for s in self.running],
        )

    def _max_steps_left(self, seq: Sequence) -> int:
        """Steps until a running sequence ends at the latest (it may stop sooner)."""
        max_tokens = min(seq.params.max_tokens, self.max_model_len - seq.num_prompt_tokens)
        return max(1, max_tokens - seq.num_output_tokens)

    def _tokens_to_compute(self, seq: Sequence) -> int:
        """Tokens a queued sequence still needs computed before it samples (prefix-cache hits excluded)."""
        if seq.status is SequenceStatus.WAITING:
            cached = len(self.kv_cache.get_computed_blocks(seq)) * self.kv_cache.block_size
            return seq.num_tokens - cached
        return seq.num_uncomputed_tokens

    def _schedule_running(self, output: SchedulerOutput) -> None:
        i = 0
        while i < len(self.running) and self._budget_left(output) > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, self._budget_left(output))
            if not self._allocate_or_preempt(seq, num_new, output):
                continue  # `seq` itself was preempted or ended; the list shifted under i
            output.add(ScheduledSequence(seq, seq.num_computed_tokens, num_new, self.kv_cache.block_ids(seq)))
            i += 1

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, output: SchedulerOutput) -> bool:
        """Finds blocks for `seq`, preempting the sequences ranked after it; False if `seq` lost its place."""
        while self.kv_cache.allocate_slots(seq, num_new) is None:
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                # Alone and still out of blocks: the pool cannot hold this sequence any longer.
                self.running.remove(seq)
                self._finish(seq, FinishReason.LENGTH)
                output.finished.append(seq)
                return False
            self._preempt(victim, output)
            if victim is seq:
                return False
        return True

    def _schedule_queued(
        self, output: SchedulerOutput, queued: list[Sequence], rank_limit: Rank | None, now: float
    ) -> None:
        """Starts (or swaps back in) queued sequences in policy order until one does not fit."""
        started: set[int] = set()
        for seq in queued:
            if self._budget_left(output) <= 0:
                return
            if rank_limit is not None and self.policy.rank(seq) >= rank_limit:
                return
            num_preempted = len(output.preempted)
            if not self._start_or_preempt(seq, output, started, now):
                return
            started.add(seq.seq_id)
            if len(output.preempted) > num_preempted:
                return  # it took someone's place: the pool is short again

    def _start_or_preempt(self, seq: Sequence, output: SchedulerOutput, started: set[int], now: float) -> bool:
        """Starts `seq`, preempting running sequences the policy lets it displace; False if it cannot."""
        while True:
            if seq.status is SequenceStatus.SWAPPED:
                result = self._swap_in(seq, output)
            else:
                result = self._admit(seq, output, now)
            if result is _Start.STARTED:
                return True
            if result is _Start.NO_BUDGET:
                return False
            victims = [s for s in self.running if s.seq_id not in started]
            victim = max(victims, key=self.policy.rank, default=None)
            if victim is None or not self.policy.may_preempt(seq, victim):
                return False
            self._preempt(victim, output)

    def _admit(self, seq: Sequence, output: SchedulerOutput, now: float) -> _Start:
        if len(self.running) >= self.config.max_num_seqs:
            return _Start.NO_ROOM
        computed_blocks = self.kv_cache.get_computed_blocks(seq)
        num_cached = len(computed_blocks) * self.kv_cache.block_size
        num_new = min(seq.num_tokens - num_cached, self._budget_left(output))
        if num_new < seq.num_tokens - num_cached and not self.config.enable_chunked_prefill:
            return _Start.NO_BUDGET
        if self.kv_cache.allocate_slots(seq, num_new, computed_blocks) is None:
            return _Start.NO_ROOM
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        seq.num_computed_tokens = num_cached
        if seq.first_scheduled_time is None:
            seq.num_cached_tokens = num_cached
            seq.first_scheduled_time = now
            self.stats.record_start(seq, now - seq.arrival_time)
            self.policy.on_served(seq, seq.num_prompt_tokens)
            self.admission.dequeue(seq, now, started=True)
        self.running.append(seq)
        output.add(ScheduledSequence(seq, num_cached, num_new, self.kv_cache.block_ids(seq)))
        return _Start.STARTED

    def _swap_in(self, seq: Sequence, output: SchedulerOutput) -> _Start:
        if len(self.running) >= self.config.max_num_seqs:
            return _Start.NO_ROOM
        num_new = min(seq.num_uncomputed_tokens, self._budget_left(output))
        if num_new < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill:
            return _Start.NO_BUDGET
        mapping = self.kv_cache.swap_in(seq, num_new)
        if mapping is None:
            return _Start.NO_ROOM
        self.swapped.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        output.swap_in.extend(mapping)
        self.stats.num_blocks_swapped_in += len(mapping)
        output.add(ScheduledSequence(seq, seq.num_computed_tokens, num_new, self.kv_cache.block_ids(seq)))
        return _Start.STARTED

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        """Takes a running sequence's blocks: swapped to the CPU pool when the mode is swap and the
        pool has room, else freed (full ones stay cached) to be recomputed."""
        output.remove(seq)
        self.running.remove(seq)
        seq.num_preemptions += 1
        output.preempted.append(seq)
        if self.config.preemption_mode == PreemptionMode.SWAP:
            mapping = self.kv_cache.swap_out(seq)
            if mapping is not None:
                seq.status = SequenceStatus.SWAPPED
                self.swapped.append(seq)
                output.swap_out.extend(mapping)
                self.stats.record_preemption(seq, PreemptionMode.SWAP, len(mapping))
                return
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.append(seq)
        self.stats.record_preemption(seq, PreemptionMode.RECOMPUTE)

    def _budget_left(self, output: SchedulerOutput) -> int:
        return self.config.max_num_batched_tokens - output.num_batched_tokens

    def _queue_of(self, seq: Sequence) -> list[Sequence]:
        if seq.status is SequenceStatus.RUNNING:
            return self.running
        if seq.status is SequenceStatus.SWAPPED:
            return self.swapped
        return self.waiting

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                return FinishReason.STOP
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.kv_cache.free(seq)
        if seq.first_scheduled_time is None:
            self.admission.dequeue(seq, self.clock(), started=False)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_computed_tokens = 0
        self.stats.record_finish(seq, reason)
        self.policy.on_finish(seq)


def _is_expired(seq: Sequence, now: float) -> bool:
    """Past its queue timeout without having started, or past its deadline without a first token."""
    if seq.first_scheduled_time is None and seq.queue_timeout is not None and now >= seq.queue_timeout:
        return True
    return seq.deadline is not None and seq.first_token_time is None and now > seq.deadline
