"""`GET /admin/status`: every model and backend as the gateway sees it, what each lmserve server says
of its own load, and the model's recent traffic (history.py), in one JSON document for the console.

The gateway's own view (health, readiness, breaker, requests in flight) is always there. Queue
depth, running sequences and KV cache usage come from each backend's `GET /v1/status` (lmserve
servers have it), asked at most every `SERVER_STATUS_TTL` seconds with a short timeout; a backend
that does not answer, or is not an lmserve server, has `"server": null`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from lmserve.gateway.backends import Backend
from lmserve.gateway.history import TrafficHistory
from lmserve.gateway.router import Router
from lmserve.gateway.upstream import UpstreamError, UpstreamPool

SERVER_STATUS_TIMEOUT = 1.0
"""Seconds to wait for a backend's `/v1/status`: a slow one must not stall the console."""
SERVER_STATUS_TTL = 1.0
"""Answers reused for this long, so several consoles polling cost a backend one request a second."""
_SERVER_FIELDS = ("state", "running", "waiting", "kv_cache_usage", "prefix_cache_hit_rate", "in_flight")


class StatusView:
    """Builds the status document; `_servers` caches backend answers by URL for `SERVER_STATUS_TTL`."""

    def __init__(self, router: Router, upstream: UpstreamPool, history: TrafficHistory) -> None:
        self.router = router
        self.upstream = upstream
        self.history = history
        self._servers: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def __call__(self) -> dict[str, Any]:
        backends = {b.url: b for _, b in self.router.all_backends()}
        now = time.monotonic()
        stale = [b for url, b in backends.items() if now - self._servers.get(url, (-SERVER_STATUS_TTL, None))[0]
                 >= SERVER_STATUS_TTL]
        answers = await asyncio.gather(*(self._server_status(b) for b in stale))
        for backend, answer in zip(stale, answers):
            self._servers[backend.url] = (now, answer)
        for url in list(self._servers):
            if url not in backends:  # removed by discovery or the admin API
                del self._servers[url]
        models = []
        for pool in self.router.pools.values():
            models.append({
                "name": pool.name, "strategy": pool.config.strategy, "in_flight": self.router.in_flight[pool.name],
                "max_in_flight": pool.config.max_in_flight, "available": len(pool.available()),
                "backends": [{**b.describe(), "available": b.is_available(), "server": self._servers[b.url][1]}
                             for b in pool.backends],
                "history": self.history.of(pool.name),
            })
        return {"time": time.time(), "interval_seconds": self.history.interval, "models": models}

    async def _server_status(self, backend: Backend) -> dict[str, Any] | None:
        headers = [(b"authorization", backend.auth_header)] if backend.auth_header else []
        try:
            response = await self.upstream.request(backend.url, b"GET", b"/v1/status", headers, b"",
                                                   SERVER_STATUS_TIMEOUT, SERVER_STATUS_TIMEOUT)
        except UpstreamError:
            return None
        try:
            body = await asyncio.wait_for(response.read(), SERVER_STATUS_TIMEOUT)
        except (asyncio.TimeoutError, UpstreamError):
            return None
        finally:
            response.release()
        if response.status != 200:
            return None
        try:
            info = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return {k: info[k] for k in _SERVER_FIELDS if k in info} if isinstance(info, dict) else None
