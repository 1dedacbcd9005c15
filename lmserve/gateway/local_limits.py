"""What this gateway replica admitted itself, per principal: the floor under shared (Redis) limits.

`RedisRateLimiter` asks these counts first and keeps them up to date on every request, so that when
Redis is unreachable, or comes back empty after a restart, a key still gets no more than its limit
from this replica instead of the gateway failing open.

Invariant: while Redis answers, a local window is Redis's window (its start, read in this process's
clock), and its counts are this replica's admissions and tokens in it: a subset of what Redis counts.
So a local refusal (count at the limit) is one Redis would give too; local counts are never stricter
than the shared limit. A window opened while Redis was away starts at the first request then, and
runs its full length even if Redis comes back meanwhile (the state Redis lost is what it counts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from lmserve.gateway.auth import Principal
from lmserve.gateway.ratelimit import LimitState, limit_reason


@dataclass
class _Window:
    start: float
    num_requests: int = 0
    num_tokens: int = 0


class LocalCounts:
    """Per-principal windows of `window_seconds`, plus the last budget use Redis reported."""

    def __init__(self, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window_seconds
        # A window read from Redis ends this much early here, so network delay in converting its
        # start to the local clock can only make the local count more lenient, never stricter.
        self.slack = min(1.0, window_seconds / 10)
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._budget_used: dict[str, int] = {}

    def _open(self, principal_id: str, now: float) -> _Window | None:
        window = self._windows.get(principal_id)
        if window is not None and now - window.start < self.window - self.slack:
            return window
        return None

    def refusal(self, principal: Principal) -> LimitState | None:
        """The refusal this replica's own counts call for (no Redis needed), else None."""
        now = self.clock()
        window = self._open(principal.id, now)
        used = self._budget_used.get(principal.id, 0)
        if window is None:  # no window open here: only the budget can refuse
            if principal.budget_tokens is None or used < principal.budget_tokens:
                return None
            return LimitState("budget", now, 0, 0, used, now)
        reason = limit_reason(principal, window.num_requests, window.num_tokens, used)
        if reason is None:
            return None
        return LimitState(reason, window.start, window.num_requests, window.num_tokens, used, now)

    def admit_alone(self, principal: Principal) -> LimitState:
        """Admits on local counts only (Redis unreachable); call after `refusal` returned None."""
        now = self.clock()
        window = self._open(principal.id, now)
        if window is None:
            window = self._windows[principal.id] = _Window(now)
        window.num_requests += 1
        used = self._budget_used.get(principal.id, 0)
        return LimitState(None, window.start, window.num_requests, window.num_tokens, used, now)

    def follow(self, principal: Principal, shared: LimitState) -> None:
        """Mirrors Redis's answer `shared` (its clock): adopts its window when none is open here,
        and counts the admission."""
        now = self.clock()
        window = self._open(principal.id, now)
        if window is None:
            window = self._windows[principal.id] = _Window(now - (shared.now - shared.window_start))
        if shared.reason is None:
            window.num_requests += 1
        self._budget_used[principal.id] = max(shared.budget_used, self._budget_used.get(principal.id, 0))

    def record_tokens(self, principal: Principal, num_tokens: int) -> None:
        window = self._open(principal.id, self.clock())
        if window is not None:
            window.num_tokens += num_tokens
        if principal.budget_tokens is not None:
            self._budget_used[principal.id] = self._budget_used.get(principal.id, 0) + num_tokens
