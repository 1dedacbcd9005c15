"""LocalCounts: this replica's own admissions, in Redis's windows, on a scripted clock."""

from __future__ import annotations

from lmserve.gateway.auth import Principal
from lmserve.gateway.local_limits import LocalCounts
from lmserve.gateway.ratelimit import LimitState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(rpm: int | None = None, tpm: int | None = None, budget: int | None = None, name: str = "k1") -> Principal:
    return Principal(name, name, None, None, rpm, tpm, budget)


def shared(start: float, now: float, admitted: bool = True, used: int = 0) -> LimitState:
    """Redis's answer, in Redis's clock (offset from the local one on purpose)."""
    return LimitState(None if admitted else "requests", start + 5000, 1, 0, used, now + 5000)


def test_follows_redis_windows_and_refuses_at_the_limit() -> None:
    clock = Clock()
    local = LocalCounts(60.0, clock)
    principal = key(rpm=2)
    assert local.refusal(principal) is None
    local.follow(principal, shared(start=990.0, now=1000.0))  # Redis's window opened 10 s ago
    local.follow(principal, shared(start=990.0, now=1000.0))
    refused = local.refusal(principal)
    assert refused is not None and refused.reason == "requests" and refused.window_start == 990.0
    clock.now = 990.0 + 59.5  # still inside the window (less the slack of 1 s): refusing would be stricter
    assert local.refusal(principal) is None


def test_a_refused_answer_is_not_counted() -> None:
    local = LocalCounts(60.0, Clock())
    principal = key(rpm=1)
    local.follow(principal, shared(start=1000.0, now=1000.0, admitted=False))
    assert local.refusal(principal) is None


def test_alone_counts_in_a_window_of_its_own() -> None:
    clock = Clock()
    local = LocalCounts(10.0, clock)
    principal = key(rpm=1)
    assert local.admit_alone(principal).reason is None
    assert local.refusal(principal) is not None
    clock.now += 9.5  # the window less the slack (1 s for a 10 s window)
    assert local.refusal(principal) is None


def test_an_open_window_outlives_a_redis_that_came_back_empty() -> None:
    clock = Clock()
    local = LocalCounts(60.0, clock)
    principal = key(rpm=2)
    local.follow(principal, shared(start=1000.0, now=1000.0))
    clock.now = 1020.0
    local.follow(principal, shared(start=1020.0, now=1020.0))  # a fresh Redis window: Redis lost its state
    assert local.refusal(principal) is not None


def test_tokens_and_budget() -> None:
    local = LocalCounts(60.0, Clock())
    principal = key(tpm=100, budget=500)
    local.follow(principal, shared(start=1000.0, now=1000.0, used=450))
    local.record_tokens(principal, 60)
    refused = local.refusal(principal)
    assert refused is not None and refused.reason == "budget" and refused.budget_used == 510
    other = key(tpm=100, name="k2")
    local.follow(other, shared(start=1000.0, now=1000.0))
    local.record_tokens(other, 99)
    assert local.refusal(other) is None
    local.record_tokens(other, 1)
    assert local.refusal(other).reason == "tokens"  # type: ignore[union-attr]
