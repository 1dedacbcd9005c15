"""The interface every scheduling policy implements. Pure Python."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from lmserve.engine.estimators import PrefillLine
from lmserve.engine.sequence import Sequence

Rank = tuple[float, float, int]
"""Sort key of a sequence under a policy: lower runs first; unique (it ends with the seq_id)."""


class SchedulingPolicy(Protocol):
    """Decides which queued sequence starts next and which running sequence gives way.

    The scheduler calls the hooks as sequences come and go; a policy that keeps no state leaves
    them as they are. Classes subclass this Protocol explicitly to inherit the defaults.
    """

    def rank(self, seq: Sequence) -> Rank:
        """Lower ranks run first; under block pressure the running sequence ranked highest is preempted."""
        ...

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        """The queued (waiting or swapped) sequences in the order they should start."""
        return sorted(seqs, key=self.rank)

    def may_preempt(self, seq: Sequence, victim: Sequence) -> bool:
        """Whether queued `seq` may take the blocks of running `victim` to start now."""
        return False

    def on_add(self, seq: Sequence) -> None:
        """A sequence entered the engine."""
        return None  # noqa: RET501 (an empty body would make mypy call the default abstract)

    def on_served(self, seq: Sequence, num_tokens: int) -> None:
        """`seq` was served `num_tokens` more tokens (its prompt when it first starts, then each output)."""
        return None  # noqa: RET501 (an empty body would make mypy call the default abstract)

    def on_finish(self, seq: Sequence) -> None:
        """A sequence left the engine (any finish reason)."""
        return None  # noqa: RET501 (an empty body would make mypy call the default abstract)

    def find_hopeless(
        self, ordered: list[Sequence], now: float, make_line: Callable[[], PrefillLine]
    ) -> list[Sequence]:
        """Queued sequences (from `order`) that can no longer meet their deadline and should end now.

        `make_line` builds the estimate of when each would get its first token (built on demand:
        it costs a pass over the running sequences)."""
        return []
