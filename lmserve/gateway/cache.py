"""Exact-match response cache for deterministic requests, in-process LRU or Redis.

A request is cacheable when it is not streamed and is deterministic: `temperature` is 0 or a
`seed` is given. An answer is stored only when it is complete (`is_complete_answer`): a truncated
one (finish reason `timeout`/`abort`, an error body) would otherwise be replayed for the TTL and as
the stale fallback. The key is a hash of the path, the caller's tenant (so one tenant never sees
another's responses) and the request body with sorted keys. An entry is fresh for `ttl` seconds
and may be served stale for `stale_ttl` more when every backend fails.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any, Protocol

import orjson


class ResponseCache(Protocol):
    async def get(self, key: str) -> tuple[bytes, float] | None:
        """Returns (response body, age in seconds) or None."""
        ...

    async def put(self, key: str, body: bytes) -> None: ...

    async def close(self) -> None: ...


def is_cacheable(body: dict[str, Any]) -> bool:
    if body.get("stream"):
        return False
    return body.get("temperature") == 0 or body.get("seed") is not None


COMPLETE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})
"""Finish reasons of an answer the model ended itself (or its budget did): safe to replay."""


def is_complete_answer(data: bytes) -> bool:
    """True for a well-formed completion whose every choice finished with a complete reason."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(payload, dict) or "error" in payload:
        return False
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") in COMPLETE_FINISH_REASONS for c in choices)


def cache_key(path: str, tenant: str | None, body: dict[str, Any]) -> str:
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(path.encode() + b"\0" + (tenant or "").encode() + b"\0" + canonical)
    return digest.hexdigest()


class MemoryCache:
    """LRU of at most `max_entries`; entries older than ttl + stale_ttl are dropped on read."""

    def __init__(self, max_entries: int, max_age: float) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    async def get(self, key: str) -> tuple[bytes, float] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = time.time() - entry[1]
        if age > self.max_age:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0], age

    async def put(self, key: str, body: bytes) -> None:
        self._entries[key] = (body, time.time())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


class RedisCache:
    """Entries shared by every replica; Redis expires them after ttl + stale_ttl."""

    def __init__(self, client: Any, max_age: float) -> None:
        self.client = client
        self.max_age = max(1, int(max_age))

    async def get(self, key: str) -> tuple[bytes, float] | None:
        raw = await self.client.get(f"lmserve:cache:{key}")
        if raw is None:
            return None
        stored_at, _, body = raw.partition(b"\n")
        return body, time.time() - float(stored_at)

    async def put(self, key: str, body: bytes) -> None:
        await self.client.set(f"lmserve:cache:{key}", f"{time.time():.3f}\n".encode() + body, ex=self.max_age)

    async def close(self) -> None:
        return None
