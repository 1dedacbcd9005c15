"""Admission control: a bounded queue of requests that have not started. Pure Python."""

from __future__ import annotations

import math

from lmserve.engine.errors import EngineOverloaded
from lmserve.engine.estimators import RateMeter
from lmserve.engine.sequence import Sequence


class AdmissionControl:
    """Refuses new requests at once when too many requests or prompt tokens wait to start.

    Only requests that have not started count: sequences that were preempted are admitted work and
    are never refused or dropped. Invariants: `_num_unstarted[r]` is the number of request r's
    sequences that never started and is never 0; `num_queued_tokens` is the sum of the prompt
    lengths of the requests in `_num_unstarted` (once per request, whatever its n).
    """

    def __init__(self, max_queued_requests: int | None, max_queued_tokens: int | None) -> None:
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.num_queued_tokens = 0
        self._num_unstarted: dict[str, int] = {}
        self._starts = RateMeter()

    @property
    def num_queued_requests(self) -> int:
        return len(self._num_unstarted)

    def check(self, num_prompt_tokens: int, now: float) -> None:
        """Raises EngineOverloaded when a request of `num_prompt_tokens` would go beyond a limit."""
        limit = self.max_queued_requests
        if limit is not None and self.num_queued_requests + 1 > limit:
            raise EngineOverloaded(
                f"the engine is overloaded: {self.num_queued_requests} requests wait to start "
                f"(max_queued_requests={limit})",
                limit="max_queued_requests",
                retry_after=self._retry_after(self.num_queued_requests + 1 - limit, now),
            )
        limit = self.max_queued_tokens
        if limit is not None and self.num_queued_tokens + num_prompt_tokens > limit:
            if num_prompt_tokens > limit:
                raise ValueError(
                    f"the prompt has {num_prompt_tokens} tokens, more than max_queued_tokens={limit}"
                )
            excess = self.num_queued_tokens + num_prompt_tokens - limit
            mean_tokens = self.num_queued_tokens / max(1, self.num_queued_requests)
            raise EngineOverloaded(
                f"the engine is overloaded: {self.num_queued_tokens} prompt tokens wait to start "
                f"(max_queued_tokens={limit})",
                limit="max_queued_tokens",
                retry_after=self._retry_after(math.ceil(excess / max(1.0, mean_tokens)), now),
            )

    def enqueue(self, seq: Sequence) -> None:
        count = self._num_unstarted.get(seq.request_id, 0)
        if count == 0:
            self.num_queued_tokens += seq.num_prompt_tokens
        self._num_unstarted[seq.request_id] = count + 1

    def dequeue(self, seq: Sequence, now: float, started: bool) -> None:
        """`seq` left the queue for the first time: it started, or it ended before starting."""
        count = self._num_unstarted.get(seq.request_id)
        if count is None:
            return
        if count > 1:
            self._num_unstarted[seq.request_id] = count - 1
            return
        del self._num_unstarted[seq.request_id]
        self.num_queued_tokens -= seq.num_prompt_tokens
        if started:
            self._starts.record(now)

    def _retry_after(self, num_starts_needed: int, now: float) -> float | None:
        """Seconds until that many queued requests start, at the rate they recently started."""
        rate = self._starts.rate(now)
        if rate is None:
            return None
        return num_starts_needed / rate
