"""First come, first served: arrival order. Pure Python."""

from __future__ import annotations

from lmserve.engine.policies.base import Rank, SchedulingPolicy
from lmserve.engine.sequence import Sequence


class FcfsPolicy(SchedulingPolicy):
    """Sequences start in arrival order; the latest arrival is preempted first."""

    def rank(self, seq: Sequence) -> Rank:
        return (0.0, seq.arrival_time, seq.seq_id)
