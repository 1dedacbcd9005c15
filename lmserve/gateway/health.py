"""Active health probes: `GET /health` (liveness) and `GET /ready` (where the backend has it).

Two kinds of bad probe are counted apart, since the last good one:
- a hard failure (connection refused or reset, a 5xx such as `/health` "dead"): after
  `unhealthy_after` of them the backend gets no traffic;
- a timeout (no answer within `probe_timeout`): a loaded server that still streams tokens can be slow
  to answer a probe, so timeouts alone eject a backend only after `timeout_unhealthy_after` of them,
  and never when that would leave its model without a backend that can take traffic (like Envoy's
  panic threshold: better a slow backend than none).
One good probe makes a backend healthy again. `/ready` answering 404 means the backend has no
readiness endpoint: ready; a `/ready` that times out leaves readiness as it was.
Passive outlier detection is the circuit breaker fed by real traffic (see breaker.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterable

from lmserve.gateway.backends import Backend, ModelPool
from lmserve.gateway.config import HealthConfig
from lmserve.gateway.upstream import UpstreamError, UpstreamPool
from lmserve.gateway.waiter import stop_task

log = logging.getLogger("lmserve.gateway")


class Outcome(enum.Enum):
    OK = "ok"
    TIMEOUT = "timeout"
    FAILED = "failed"


class HealthChecker:
    """Probes every backend each `probe_interval`; `backends()` yields (model pool, backend) pairs."""

    def __init__(self, pool: UpstreamPool, config: HealthConfig,
                 backends: Callable[[], Iterable[tuple[ModelPool, Backend]]]) -> None:
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
        pairs = list(self.backends())
        unique = {id(b): b for _, b in pairs}
        await asyncio.gather(*(self.probe(b) for b in unique.values()))
        self._apply_timeouts(pairs)

    async def _get(self, backend: Backend, path: bytes) -> int | Outcome:
        """The status of GET `path`, or TIMEOUT / FAILED when no answer came."""
        headers = [(b"authorization", backend.auth_header)] if backend.auth_header else []
        timeout = self.config.probe_timeout
        try:
            response = await self.pool.request(backend.url, b"GET", path, headers, b"", timeout, timeout)
        except UpstreamError as exc:
            return Outcome.TIMEOUT if exc.is_timeout else Outcome.FAILED
        try:
            await asyncio.wait_for(response.read(), timeout)
        except asyncio.TimeoutError:
            return Outcome.TIMEOUT
        except UpstreamError as exc:
            return Outcome.TIMEOUT if exc.is_timeout else Outcome.FAILED
        finally:
            response.release()
        return response.status

    async def probe(self, backend: Backend) -> Outcome:
        """Probes one backend and updates its counters; hard failures eject it here, timeouts in
        `_apply_timeouts` (which needs the whole model)."""
        answer = await self._get(backend, b"/health")
        outcome = Outcome.OK if answer == 200 else answer if isinstance(answer, Outcome) else Outcome.FAILED
        if outcome is Outcome.OK:
            ready = await self._get(backend, b"/ready")
            if ready is not Outcome.TIMEOUT:
                backend.is_ready = ready in (200, 404)
            if not backend.is_healthy:
                log.info("backend %s is healthy again", backend.url)
            backend.is_healthy = True
            backend.num_probe_failures = backend.num_probe_timeouts = 0
        elif outcome is Outcome.TIMEOUT:
            backend.num_probe_timeouts += 1
        else:
            backend.num_probe_failures += 1
            if backend.num_probe_failures >= self.config.unhealthy_after and backend.is_healthy:
                log.warning("backend %s failed %d probes (%s): no traffic until it recovers",
                            backend.url, backend.num_probe_failures,
                            "no connection" if answer is Outcome.FAILED else f"status {answer}")
                backend.is_healthy = False
        return outcome

    def _is_hard_down(self, backend: Backend) -> bool:
        return backend.num_probe_failures >= self.config.unhealthy_after

    def _is_slow(self, backend: Backend) -> bool:
        return not self._is_hard_down(backend) and backend.num_probe_timeouts >= self.config.timeout_unhealthy_after

    def _apply_timeouts(self, pairs: list[tuple[ModelPool, Backend]]) -> None:
        """Ejects a backend whose probes keep timing out only while every model it serves keeps
        another backend that can take traffic; takes it back when that stops being true."""
        serving: dict[int, int] = {}  # id(pool) -> backends that can take traffic, slow ones left out
        for pool, backend in pairs:
            can_serve = backend.is_healthy and backend.is_ready and not backend.is_draining
            serving[id(pool)] = serving.get(id(pool), 0) + (can_serve and not self._is_slow(backend))
        keep: dict[int, bool] = {}  # id(backend) -> True when one of its models has no other backend
        for pool, backend in pairs:
            if self._is_slow(backend):
                keep[id(backend)] = keep.get(id(backend), False) or serving[id(pool)] == 0
        for pool, backend in pairs:
            if id(backend) not in keep:
                continue
            healthy = keep.pop(id(backend))
            if healthy and not backend.is_healthy:
                log.warning("backend %s: %d probes timed out, but its model %s has no other backend: "
                            "kept in rotation", backend.url, backend.num_probe_timeouts, pool.name)
            elif not healthy and backend.is_healthy:
                log.warning("backend %s: %d probes timed out: no traffic until one answers in time",
                            backend.url, backend.num_probe_timeouts)
            backend.is_healthy = healthy

    async def close(self) -> None:
        await stop_task(self._task)
