"""Per-principal requests-per-minute, tokens-per-minute and token budgets.

Semantics (the same in both implementations, so replicas sharing Redis behave like one gateway):
- A window opens at a principal's first request and lasts `window_seconds`; its request and token
  counters start at 0.
- A request is admitted when the window's request count is below `rpm`, its token count below
  `tpm`, and the lifetime token count below `budget_tokens`. Admission increments the request count
  in the same atomic step, so N concurrent requests across replicas admit exactly `rpm`.
- Tokens (prompt + completion, from the backend's `usage`) are added when a response finishes.
  A request admitted just under the token limit may overshoot it; the next one is refused.
- Budgets persist: the Redis counter has no expiry, and a fresh counter is seeded from the ledger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from lmserve.gateway.auth import Principal
from lmserve.gateway.errors import GatewayError

BudgetSeed = Callable[[str], Awaitable[int]]


@dataclass
class LimitState:
    """Counters after an admission attempt; `reason` is None when admitted."""

    reason: str | None
    window_start: float
    num_requests: int
    num_tokens: int
    budget_used: int
    now: float


class RateLimiter(Protocol):
    async def admit(self, principal: Principal) -> LimitState: ...

    async def record_tokens(self, principal: Principal, num_tokens: int) -> None: ...

    async def close(self) -> None: ...


def has_limits(principal: Principal) -> bool:
    return principal.rpm is not None or principal.tpm is not None or principal.budget_tokens is not None


def limit_reason(principal: Principal, num_requests: int, num_tokens: int, budget_used: int) -> str | None:
    """The limit that refuses a request at these counts (budget, then requests, then tokens), or None.
    The Redis script (redis_ratelimit.py) decides in the same order."""
    if principal.budget_tokens is not None and budget_used >= principal.budget_tokens:
        return "budget"
    if principal.rpm is not None and num_requests >= principal.rpm:
        return "requests"
    if principal.tpm is not None and num_tokens >= principal.tpm:
        return "tokens"
    return None


def limit_headers(principal: Principal, state: LimitState, window: float) -> list[tuple[bytes, bytes]]:
    """OpenAI-style `x-ratelimit-*` headers (reset in seconds, e.g. `12.5s`)."""
    reset = b"%.1fs" % max(0.0, state.window_start + window - state.now)
    headers: list[tuple[bytes, bytes]] = []
    if principal.rpm is not None:
        headers += [(b"x-ratelimit-limit-requests", b"%d" % principal.rpm),
                    (b"x-ratelimit-remaining-requests", b"%d" % max(0, principal.rpm - state.num_requests)),
                    (b"x-ratelimit-reset-requests", reset)]
    if principal.tpm is not None:
        headers += [(b"x-ratelimit-limit-tokens", b"%d" % principal.tpm),
                    (b"x-ratelimit-remaining-tokens", b"%d" % max(0, principal.tpm - state.num_tokens)),
                    (b"x-ratelimit-reset-tokens", reset)]
    if principal.budget_tokens is not None:
        headers += [(b"x-ratelimit-limit-budget-tokens", b"%d" % principal.budget_tokens),
                    (b"x-ratelimit-remaining-budget-tokens", b"%d" % max(0, principal.budget_tokens - state.budget_used))]
    return headers


def refusal(principal: Principal, state: LimitState, window: float) -> GatewayError:
    """The 429 for a refused admission, with Retry-After (except for an exhausted budget)."""
    headers = limit_headers(principal, state, window)
    if state.reason == "budget":
        return GatewayError(429, "Token budget exhausted for this key.", "insufficient_quota",
                            "insufficient_quota", headers=headers)
    retry_after = max(1, math.ceil(state.window_start + window - state.now))
    headers.append((b"retry-after", str(retry_after).encode()))
    what = "requests" if state.reason == "requests" else "tokens"
    return GatewayError(429, f"Rate limit reached for {what} per minute; retry in {retry_after}s.",
                        "rate_limit_error", "rate_limit_exceeded", headers=headers)


class MemoryRateLimiter:
    """In-process counters: exact for one gateway process."""

    def __init__(self, window_seconds: float, seed_budget: BudgetSeed | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.window = window_seconds
        self.seed_budget = seed_budget
        self.clock = clock
        self._windows: dict[str, list[float]] = {}
        self._budgets: dict[str, int] = {}

    async def admit(self, principal: Principal) -> LimitState:
        pid = principal.id
        if principal.budget_tokens is not None and pid not in self._budgets:
            seeded = await self.seed_budget(pid) if self.seed_budget else 0
            self._budgets.setdefault(pid, seeded)
        now = self.clock()
        window = self._windows.get(pid)
        if window is None or now - window[0] >= self.window:
            window = [now, 0, 0]
            self._windows[pid] = window
        used = self._budgets.get(pid, 0)
        reason = limit_reason(principal, int(window[1]), int(window[2]), used)
        if reason is None:
            window[1] += 1
        return LimitState(reason, window[0], int(window[1]), int(window[2]), used, now)

    async def record_tokens(self, principal: Principal, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        window = self._windows.get(principal.id)
        if window is not None and self.clock() - window[0] < self.window:
            window[2] += num_tokens
        if principal.budget_tokens is not None:
            self._budgets[principal.id] = self._budgets.get(principal.id, 0) + num_tokens

    async def close(self) -> None:
        return None
