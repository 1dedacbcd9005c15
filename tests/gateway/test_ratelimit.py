"""In-process limiter semantics (the Redis one is checked across two real gateways in test_limits_e2e.py)."""

import asyncio

from lmserve.gateway.auth import Principal
from lmserve.gateway.ratelimit import MemoryRateLimiter, limit_headers, refusal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principal(**limits: int) -> Principal:
    return Principal("k1", "k1", None, None, limits.get("rpm"), limits.get("tpm"), limits.get("budget"))


def test_rpm_window_admits_exactly_rpm_then_resets() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(60, clock=clock)
    p = principal(rpm=3)
    reasons = [asyncio.run(limiter.admit(p)).reason for _ in range(5)]
    assert reasons == [None, None, None, "requests", "requests"]
    clock.now += 59.9
    assert asyncio.run(limiter.admit(p)).reason == "requests"
    clock.now += 0.1
    assert asyncio.run(limiter.admit(p)).reason is None


def test_tpm_and_budget() -> None:
    clock = Clock()
    seeded = []

    async def seed(pid: str) -> int:
        seeded.append(pid)
        return 40

    limiter = MemoryRateLimiter(60, seed_budget=seed, clock=clock)
    p = principal(tpm=50, budget=130)

    async def run() -> list[str | None]:
        out = []
        for _ in range(4):
            state = await limiter.admit(p)
            out.append(state.reason)
            if state.reason is None:
                await limiter.record_tokens(p, 30)
        return out

    assert asyncio.run(run()) == [None, None, "tokens", "tokens"]  # 30, 60 >= 50
    assert seeded == ["k1"]  # once
    clock.now += 60  # new window; budget: 40 seeded + 60 used = 100 < 130
    assert asyncio.run(limiter.admit(p)).reason is None
    asyncio.run(limiter.record_tokens(p, 30))
    assert asyncio.run(limiter.admit(p)).reason == "budget"


def test_headers_and_refusal() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(60, clock=clock)
    p = principal(rpm=1, tpm=100)
    asyncio.run(limiter.admit(p))
    clock.now += 20
    state = asyncio.run(limiter.admit(p))
    headers = dict(limit_headers(p, state, 60))
    assert headers[b"x-ratelimit-limit-requests"] == b"1"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"100"
    assert headers[b"x-ratelimit-reset-requests"] == b"40.0s"
    error = refusal(p, state, 60)
    assert error.status == 429 and dict(error.headers)[b"retry-after"] == b"40"
    assert error.code == "rate_limit_exceeded"
