"""Active health probes: `GET /health` (liveness) and `GET /ready` (where the backend has it).

A backend is marked unhealthy after `unhealthy_after` failed probes in a row and healthy again after
one good probe. `/ready` answering 404 means the backend has no readiness endpoint: ready.
Passive outlier detection is the circuit breaker fed by real traffic (see breaker.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from lmserve.gateway.backends import Backend
from lmserve.gateway.config import HealthConfig
from lmserve.gateway.upstream import UpstreamError, UpstreamPool

log = logging.getLogger("lmserve.gateway")


class HealthChecker:
    def __init__(self, pool: UpstreamPool, config: HealthConfig,
                 backends: Callable[[], Iterable[Backend]]) -> None:
        self.pool = pool
        self.config = config
        self.backends = backends
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.config.probe_interval)

    async def probe_all(self) -> None:
        unique = {id(b): b for b in self.backends()}
        await asyncio.gather(*(self.probe(b) for b in unique.values()))

    async def _get(self, backend: Backend, path: bytes) -> int | None:
        headers = [(b"authorization", backend.auth_header)] if backend.auth_header else []
        try:
            response = await self.pool.request(backend.url, b"GET", path, headers, b"",
                                               self.config.probe_timeout, self.config.probe_timeout)
        except UpstreamError:
            return None
        try:
            await asyncio.wait_for(response.read(), self.config.probe_timeout)
        except (UpstreamError, asyncio.TimeoutError):
            return None
        finally:
            response.release()
        return response.status

    async def probe(self, backend: Backend) -> None:
        status = await self._get(backend, b"/health")
        if status == 200:
            ready = await self._get(backend, b"/ready")
            backend.is_ready = ready in (200, 404)
            if not backend.is_healthy:
                log.info("backend %s is healthy again", backend.url)
            backend.is_healthy = True
            backend.num_probe_failures = 0
            return
        backend.num_probe_failures += 1
        if backend.num_probe_failures >= self.config.unhealthy_after and backend.is_healthy:
            log.warning("backend %s failed %d probes: no traffic until it recovers",
                        backend.url, backend.num_probe_failures)
            backend.is_healthy = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
