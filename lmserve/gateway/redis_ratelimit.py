"""Rate limits in Redis, shared exactly by every gateway replica.

Each admission and each token record is one Lua script, so check-and-increment is atomic across
replicas, and time comes from the Redis server (`TIME`), so replicas with skewed clocks agree on
windows. Semantics match `MemoryRateLimiter` (see ratelimit.py).

Redis unreachable, or back empty after a restart, must not let a key past its limit: every
admission also counts in this replica (`LocalCounts`), which refuses first when its own counts are at
the limit and decides alone while Redis fails. Each failure is reported to `on_error` (the gateway
counts it in `lmserve_gateway_shared_state_errors_total`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmserve.gateway.auth import Principal
from lmserve.gateway.local_limits import LocalCounts
from lmserve.gateway.ratelimit import BudgetSeed, LimitState

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local used = 0
if budget >= 0 then
  local b = redis.call('GET', KEYS[2])
  if not b then return {'seed', 0, 0, 0, 0, now} end
  used = tonumber(b)
end
local start = tonumber(redis.call('HGET', KEYS[1], 's'))
if (not start) or now - start >= window then
  start = now
  redis.call('HSET', KEYS[1], 's', start, 'r', 0, 't', 0)
  redis.call('PEXPIRE', KEYS[1], window * 2)
end
local r = tonumber(redis.call('HGET', KEYS[1], 'r'))
local tk = tonumber(redis.call('HGET', KEYS[1], 't'))
local reason = 'ok'
if budget >= 0 and used >= budget then reason = 'budget'
elseif rpm >= 0 and r >= rpm then reason = 'requests'
elseif tpm >= 0 and tk >= tpm then reason = 'tokens'
else r = redis.call('HINCRBY', KEYS[1], 'r', 1) end
return {reason, start, r, tk, used, now}
"""

_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local start = tonumber(redis.call('HGET', KEYS[1], 's'))
if start and now - start < tonumber(ARGV[1]) then redis.call('HINCRBY', KEYS[1], 't', ARGV[2]) end
if ARGV[3] == '1' then redis.call('INCRBY', KEYS[2], ARGV[2]) end
return 1
"""


def _keys(principal_id: str) -> list[str]:
    # One hash tag per principal keeps both keys in one slot on Redis Cluster.
    return [f"lmserve:rl:{{{principal_id}}}", f"lmserve:budget:{{{principal_id}}}"]


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisRateLimiter:
    """Limits shared through Redis. `client` is a `redis.asyncio.Redis`."""

    def __init__(self, client: Any, window_seconds: float, seed_budget: BudgetSeed | None = None,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.client = client
        self.window_ms = int(window_seconds * 1000)
        self.seed_budget = seed_budget
        self.on_error = on_error
        self.local = LocalCounts(window_seconds)
        self._admit = client.register_script(_ADMIT)
        self._record = client.register_script(_RECORD)

    async def admit(self, principal: Principal) -> LimitState:
        refused = self.local.refusal(principal)
        if refused is not None:
            return refused
        try:
            state = await self._shared_admit(principal)
        except Exception as exc:  # noqa: BLE001 -- any failure of the shared store: local counts decide
            self._failed(exc)
            return self.local.admit_alone(principal)
        self.local.follow(principal, state)
        return state

    async def _shared_admit(self, principal: Principal) -> LimitState:
        keys = _keys(principal.id)
        args = [self.window_ms, _limit(principal.rpm), _limit(principal.tpm), _limit(principal.budget_tokens)]
        result = await self._admit(keys=keys, args=args)
        if result[0] == b"seed":
            seeded = await self.seed_budget(principal.id) if self.seed_budget else 0
            await self.client.set(keys[1], seeded, nx=True)
            result = await self._admit(keys=keys, args=args)
        reason = result[0].decode()
        return LimitState(None if reason == "ok" else reason, int(result[1]) / 1000, int(result[2]),
                          int(result[3]), int(result[4]), int(result[5]) / 1000)

    async def record_tokens(self, principal: Principal, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        self.local.record_tokens(principal, num_tokens)
        has_budget = "1" if principal.budget_tokens is not None else "0"
        try:
            await self._record(keys=_keys(principal.id), args=[self.window_ms, num_tokens, has_budget])
        except Exception as exc:  # noqa: BLE001 -- counted locally above
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error(exc)

    async def close(self) -> None:
        await self.client.aclose()
