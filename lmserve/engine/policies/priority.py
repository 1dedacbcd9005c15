"""Priority classes: lower value first, ties by arrival. Pure Python."""

from __future__ import annotations

from lmserve.engine.policies.base import Rank, SchedulingPolicy
from lmserve.engine.sequence import Sequence


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` starts first and is preempted last; a queued sequence may preempt running
    sequences of strictly higher value, so urgent work starts without waiting for a finish."""

    def rank(self, seq: Sequence) -> Rank:
        return (float(seq.priority), seq.arrival_time, seq.seq_id)

    def may_preempt(self, seq: Sequence, victim: Sequence) -> bool:
        return seq.priority < victim.priority
