"""Decides, each step, which sequences run and how many of their tokens. Pure Python.

There is one token budget per step and no separate prefill or decode phase: a sequence needs
`num_tokens - num_computed_tokens` more tokens computed, which is 1 while it decodes and more
while its prompt (or, after preemption, its whole history) is being computed, in chunks when the
budget runs out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lmserve.engine.config import SchedulerConfig
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.sequence import FinishReason, Sequence, SequenceStatus


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
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    """Sequences that ended while being scheduled (could not fit at all, timed out)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_finished: int = 0


class Scheduler:
    """Owns the waiting queue and the running list.

    Invariants: every RUNNING sequence is in `running` and holds blocks; every WAITING sequence is
    in `waiting` and holds none; FINISHED sequences are in neither and hold none.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id} is not a new waiting sequence")
        self.waiting.append(seq)

    def abort(self, seq: Sequence, reason: FinishReason = FinishReason.ABORT) -> None:
        """Ends a sequence in any state and frees everything it held, at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, reason)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self._schedule_running(output, self.config.max_num_batched_tokens)
        # After a preemption the pool is short: admitting new work now would only thrash.
        if not output.preempted:
            self._schedule_waiting(output, budget)
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
            received.append(seq)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
        return received

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new, output):
                continue  # `seq` itself was preempted or ended; the list shifted under i
            output.scheduled.append(
                ScheduledSequence(seq, seq.num_computed_tokens, num_new, self.kv_cache.block_ids(seq))
            )
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, output: SchedulerOutput) -> bool:
        """Finds blocks for `seq`, preempting the sequences after it; False if `seq` lost its place."""
        while self.kv_cache.allocate_slots(seq, num_new) is None:
            victim = self._pick_victim()
            if victim is seq and len(self.running) == 1:
                # Alone and still out of blocks: the pool cannot hold this sequence any longer.
                self.running.remove(seq)
                self._finish(seq, FinishReason.LENGTH)
                output.finished.append(seq)
                return False
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            computed_blocks = self.kv_cache.get_computed_blocks(seq)
            num_cached = len(computed_blocks) * self.kv_cache.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if num_new < seq.num_tokens - num_cached and not self.config.enable_chunked_prefill:
                break
            if self.kv_cache.allocate_slots(seq, num_new, computed_blocks) is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = num_cached
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_cached
                seq.first_scheduled_time = self.clock()
            self.running.append(seq)
            output.scheduled.append(
                ScheduledSequence(seq, num_cached, num_new, self.kv_cache.block_ids(seq))
            )
            budget -= num_new

    def _pick_victim(self) -> Sequence:
        """The running sequence to give up its blocks: the one admitted last."""
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free the blocks (full ones stay cached) and queue the sequence first."""
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(seq)

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
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_computed_tokens = 0
        self.stats.num_finished += 1
