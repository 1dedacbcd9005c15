"""Earliest deadline first, among the requests that can still meet theirs. Pure Python."""

from __future__ import annotations

import math
from collections.abc import Callable

from lmserve.engine.estimators import PrefillLine
from lmserve.engine.policies.base import Rank, SchedulingPolicy
from lmserve.engine.sequence import Sequence


def has_pending_deadline(seq: Sequence) -> bool:
    """A deadline is pending until the sequence's first token exists."""
    return seq.deadline is not None and seq.first_token_time is None


class DeadlinePolicy(SchedulingPolicy):
    """Sequences whose first token is still due start in deadline order; the rest (no deadline,
    or first token already produced) follow in arrival order and are preempted first.

    A queued sequence is hopeless when, lined up behind the unfinished prefills ranked before it,
    the measured step cost says its first token would come after its deadline: it ends with
    finish reason timeout instead of using compute that others can still use in time.
    """

    def rank(self, seq: Sequence) -> Rank:
        deadline = seq.deadline if has_pending_deadline(seq) and seq.deadline is not None else math.inf
        return (deadline, seq.arrival_time, seq.seq_id)

    def find_hopeless(
        self, ordered: list[Sequence], now: float, make_line: Callable[[], PrefillLine]
    ) -> list[Sequence]:
        hopeless: list[Sequence] = []
        line: PrefillLine | None = None
        for seq in ordered:
            if seq.deadline is None or not has_pending_deadline(seq):
                break  # ranked after every pending deadline
            line = line or make_line()
            seconds = line.seconds_until_first_token(seq)
            if seconds is None:
                break  # nothing measured yet: no grounds to give up on anyone
            if now + seconds > seq.deadline:
                hopeless.append(seq)
            else:
                line.append(seq)
        return hopeless
