"""Models loaded on demand: the gateway starts a model's server at its first request, holds that
request until the server is ready, and stops the server when it has been idle for `idle_unload` or
when another model needs its memory (least recently used first, never one with requests in flight
or one pinned by an admin).

States of a model: unloaded -> loading -> loaded -> unloading -> unloaded. Invariants:
- The memory of every model loading, loaded or unloading is at most `launch_memory_budget`: a model
  starts loading only when it fits; a model being stopped still counts until its process has exited.
- A request holds a lease on a loaded model from before it is routed until its answer ends; a model
  with leases is never stopped (so no request is cut by an eviction), and leases are taken only
  while the model is loaded, under the same lock that picks eviction victims.
- A server the gateway started dies with the gateway: it gets SIGTERM on the gateway's exit, and on
  Linux also when the gateway is killed (the parent-death signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from lmserve.gateway.config import BackendConfig, GatewayConfig
from lmserve.gateway.errors import GatewayError
from lmserve.gateway.metrics import GatewayMetrics
from lmserve.gateway.model_modes import LaunchConfig
from lmserve.gateway.router import Router
from lmserve.gateway.upstream import UpstreamError, UpstreamPool
from lmserve.gateway.waiter import stop_task

log = logging.getLogger("lmserve.gateway.launcher")
STOP_GRACE = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # loaded here, not after fork


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: only a plain libc call, no imports or allocation-heavy work."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Model:
    name: str
    config: LaunchConfig
    state: str = "unloaded"
    process: asyncio.subprocess.Process | None = None
    url: str | None = None
    leases: int = 0
    last_used: float = 0.0
    pinned: bool = False
    error: str | None = None
    failed_at: float = 0.0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Launcher:
    def __init__(self, config: GatewayConfig, router: Router, upstream: UpstreamPool, metrics: GatewayMetrics) -> None:
        self.models = {m.name: _Model(m.name, m.launch) for m in config.models if m.launch is not None}
        self.budget = config.launch_memory_budget
        self.router = router
        self.upstream = upstream
        self.metrics = metrics
        self.changed = asyncio.Condition()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.models:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        await stop_task(self._sweeper)
        await asyncio.gather(*(self._stop(m, "shutdown") for m in self.models.values() if m.process is not None),
                             return_exceptions=True)

    def states(self) -> dict[str, dict[str, object]]:
        return {m.name: {"state": m.state, "pinned": m.pinned, "in_flight": m.leases, "memory": m.config.memory,
                         "url": m.url, "last_error": m.error} for m in self.models.values()}

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[None]:
        """Holds the request until `name` is loaded (at most its `load_timeout`), then keeps it loaded
        until the block ends."""
        model = self.models[name]
        try:
            await asyncio.wait_for(self._acquire(model), model.config.load_timeout)
        except asyncio.TimeoutError:
            raise GatewayError(503, f"The model `{name}` did not load within {model.config.load_timeout:g}s "
                               "(launch.load_timeout); retry shortly.", "server_error", "model_loading",
                               headers=[(b"retry-after", b"5")]) from None
        try:
            yield
        finally:
            async with self.changed:
                model.leases -= 1
                model.last_used = time.monotonic()
                self.changed.notify_all()

    async def _acquire(self, model: _Model) -> None:
        since = time.monotonic()
        async with self.changed:
            while True:
                if model.state == "loaded":
                    model.leases += 1
                    return
                if model.error is not None and model.failed_at >= since:
                    raise GatewayError(503, f"The model `{model.name}` failed to load: {model.error}",
                                       "server_error", "model_load_failed")
                if model.state == "unloaded" and self._make_room(model):
                    model.state, model.error = "loading", None
                    self._spawn(model, self._load(model))
                await self.changed.wait()

    def _used(self) -> float:
        return sum(m.config.memory for m in self.models.values() if m.state != "unloaded")

    def _make_room(self, model: _Model) -> bool:
        """True when `model` fits now; else starts stopping idle models (LRU) and returns False. Runs
        under `changed`."""
        if self.budget is None or self._used() + model.config.memory <= self.budget:
            return True
        if any(m.state == "unloading" for m in self.models.values()):
            return False  # room is being made: wait for it before choosing more victims
        need = self._used() + model.config.memory - self.budget
        idle = sorted((m for m in self.models.values() if m.state == "loaded" and not m.leases and not m.pinned),
                      key=lambda m: m.last_used)
        for victim in idle:
            if need <= 0:
                break
            need -= victim.config.memory
            self._begin_stop(victim, "budget")
        return False

    def _begin_stop(self, model: _Model, reason: str) -> None:
        """Takes `model` out of routing at once and stops its server in the background. Runs under `changed`."""
        model.state = "unloading"
        if model.url is not None:
            with contextlib.suppress(KeyError):
                self.router.remove_backend(model.name, model.url)
        self._spawn(model, self._unload(model, reason))

    def _spawn(self, model: _Model, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        model.tasks.add(task)
        task.add_done_callback(model.tasks.discard)

    async def _load(self, model: _Model) -> None:
        started = time.monotonic()
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        config = model.config
        argv = [arg.replace("{port}", str(port)) for arg in config.command]
        log.info("loading model %s: %s", model.name, " ".join(argv))
        try:
            output = open(config.log_file, "ab") if config.log_file else subprocess.DEVNULL  # noqa: SIM115
            try:
                model.process = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    env={**os.environ, **config.env}, preexec_fn=_die_with_parent)
            finally:
                if output is not subprocess.DEVNULL:
                    output.close()  # type: ignore[union-attr]
            await self._wait_ready(model, url, started + config.load_timeout)
        except (OSError, RuntimeError) as exc:
            await self._stop(model, "failed")
            async with self.changed:
                model.state, model.error, model.failed_at = "unloaded", str(exc), time.monotonic()
                self.changed.notify_all()
            log.error("model %s failed to load: %s", model.name, exc)
            return
        async with self.changed:
            self.router.add_backend(model.name, BackendConfig(url=url, api_key=config.api_key))
            model.url, model.state, model.last_used = url, "loaded", time.monotonic()
            self.changed.notify_all()
        seconds = time.monotonic() - started
        self.metrics.model_loaded.labels(model.name).set(1)
        self.metrics.model_loads.labels(model.name).inc()
        self.metrics.model_load_seconds.labels(model.name).observe(seconds)
        log.info("model %s loaded in %.1f s at %s", model.name, seconds, url)

    async def _wait_ready(self, model: _Model, url: str, deadline: float) -> None:
        process = model.process
        while process is not None and process.returncode is None:
            try:
                response = await self.upstream.request(url, b"GET", b"/ready", [], b"", 1.0, 2.0)
                status = response.status
                response.release()
                if status == 200:
                    return
            except UpstreamError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("its server was not ready within launch.load_timeout")
            await asyncio.sleep(0.2)
        raise RuntimeError(f"its server exited with status {process.returncode if process else None}")

    async def _unload(self, model: _Model, reason: str) -> None:
        await self._stop(model, reason)
        async with self.changed:
            model.state, model.url = "unloaded", None
            self.changed.notify_all()
        self.metrics.model_loaded.labels(model.name).set(0)
        self.metrics.model_unloads.labels(model.name, reason).inc()
        log.info("model %s unloaded (%s)", model.name, reason)

    async def _stop(self, model: _Model, reason: str) -> None:
        """SIGTERM (the server drains; it has no requests in flight), SIGKILL after STOP_GRACE."""
        process, model.process = model.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE)
        except asyncio.TimeoutError:
            log.warning("model %s: server did not stop within %gs (%s); killing it", model.name, STOP_GRACE, reason)
            process.kill()
            await process.wait()

    async def _sweep(self) -> None:
        """Stops idle models, and notices servers that died (they load again at the next request)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            async with self.changed:
                for model in self.models.values():
                    if model.state != "loaded":
                        continue
                    died = model.process is None or model.process.returncode is not None
                    idle = model.config.idle_unload
                    if died or (idle and not model.pinned and not model.leases and now - model.last_used > idle):
                        self._begin_stop(model, "died" if died else "idle")

    async def admin(self, name: str, action: str) -> dict[str, object]:
        """load (waits for it), unload (when no request is in flight), pin, unpin."""
        model = self.models[name]
        if action == "load":
            async with self.lease(name):
                pass
        async with self.changed:
            if action == "unload":
                if model.leases:
                    raise GatewayError(409, f"The model `{name}` has requests in flight.", "invalid_request_error",
                                       "model_busy")
                if model.state == "loaded":
                    self._begin_stop(model, "admin")
            elif action in ("pin", "unpin"):
                model.pinned = action == "pin"
            self.changed.notify_all()
        return self.states()[name]
