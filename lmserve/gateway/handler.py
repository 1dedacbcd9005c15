"""The `/v1/*` hot path: auth, validation, limits, shedding, cache, forwarding, accounting.

Order matters for cost: cheap refusals (body size, auth from the in-memory cache, JSON, model
scope) come before anything that touches Redis or a backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson

from lmserve.gateway.asgi import (
    ClientDisconnected,
    Receive,
    Send,
    header_map,
    read_body,
    send_bytes,
    send_error,
)
from lmserve.gateway.auth import Authenticator, KeyRefused, Principal
from lmserve.gateway.cache import ResponseCache, cache_key, is_cacheable, is_complete_answer
from lmserve.gateway.config import GatewayConfig
from lmserve.gateway.ensemble import Ensembles, check_request
from lmserve.gateway.errors import GatewayError, forbidden, not_found
from lmserve.gateway.identity import (
    CLIENT_IDENTITY_FIELDS,
    PRIORITY_HEADER,
    TENANT_HEADER,
    strip_client_identity,
)
from lmserve.gateway.launcher import Launcher
from lmserve.gateway.ledger import UsageLedger
from lmserve.gateway.metrics import GatewayMetrics
from lmserve.gateway.model_modes import EnsembleConfig
from lmserve.gateway.proxy import Forwarder, PassThrough, ProxyRequest, ProxyResult, response_headers
from lmserve.gateway.ratelimit import RateLimiter, has_limits, limit_headers, refusal
from lmserve.gateway.router import Router
from lmserve.gateway.routes import FORWARDED
from lmserve.gateway.tracing import Tracer
from lmserve.gateway.validation import body_too_large, parse_json, prompt_text, validate

log = logging.getLogger("lmserve.gateway.access")
_T = TypeVar("_T")
_PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
_RANK_PRIORITY = ("high", "normal", "low")
_PRIORITY_HEADERS = {name: (PRIORITY_HEADER, name.encode()) for name in _RANK_PRIORITY}
"""The `X-Lmserve-Priority` header of each priority class, made once rather than per request."""
_WATCH_AFTER = 0.05
INTERNAL_PRINCIPAL = "lmserve.principal"
"""ASGI scope key of a request the gateway makes on a principal's behalf (a batch line): the request
skips authentication and runs as that principal. No client can set it: scopes come from the server."""
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
"""Client request ids kept as they are; anything else is replaced (it travels into headers and logs)."""


class _Guard:
    """Cancels a request task when its client disconnects or its total timeout passes.

    Quick requests (most of them) cost no timer and no task: `_Watchdog` arms the disconnect watcher
    and the total-timeout timer only once a request has run for `_WATCH_AFTER` seconds.
    """

    __slots__ = ("reason", "receive", "started", "task", "timer", "total", "watcher")

    def __init__(self, task: asyncio.Task[Any] | None, receive: Receive, total: float, started: float) -> None:
        self.task = task
        self.receive = receive
        self.total = total
        self.started = started
        self.reason: str | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def arm(self, age: float) -> None:
        loop = asyncio.get_running_loop()
        self.watcher = loop.create_task(self._watch())
        self.timer = loop.call_later(max(0.0, self.total - age), self.cancel, "timeout")

    async def _watch(self) -> None:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.cancel("disconnect")

    def cancel(self, reason: str) -> None:
        if self.reason is None and self.task is not None:
            self.reason = reason
            self.task.cancel()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


class _Watchdog:
    """Arms the guards of requests that have run for `_WATCH_AFTER` seconds, with one timer for all
    of them: a timer per request cost about a tenth of the gateway's own work per request
    (benchmarks/gateway_instructions.py).

    Invariant: `guards` holds the unarmed guards of running requests in the order they started, and
    a sweep is scheduled whenever it is not empty.
    """

    def __init__(self) -> None:
        self.guards: dict[_Guard, None] = {}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, guard: _Guard) -> None:
        self.guards[guard] = None
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(_WATCH_AFTER, self._sweep)

    def remove(self, guard: _Guard) -> None:
        self.guards.pop(guard, None)

    def _sweep(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        guards = self.guards
        while guards:
            oldest = next(iter(guards))
            age = now - oldest.started
            if age < _WATCH_AFTER:
                self.timer = loop.call_later(_WATCH_AFTER - age, self._sweep)
                return
            del guards[oldest]
            oldest.arm(age)


def _priority(requested: bytes | None, principal: Principal) -> str:
    """X-Priority may lower a request's priority, never raise it above its key's."""
    own = _PRIORITY_RANK.get(principal.priority, 1)
    asked = _PRIORITY_RANK.get(requested.decode("latin-1").lower(), own) if requested else own
    return _RANK_PRIORITY[max(own, asked)]


class ProxyHandler:
    def __init__(self, config: GatewayConfig, router: Router, forwarder: Forwarder, auth: Authenticator,
                 limiter: RateLimiter, cache: ResponseCache | None, ledger: UsageLedger,
                 metrics: GatewayMetrics, tracer: Tracer | None, launcher: Launcher) -> None:
        self.config = config
        self.limits = config.limits
        self.router = router
        self.forwarder = forwarder
        self.auth = auth
        self.limiter = limiter
        self.cache = cache
        self.ledger = ledger
        self.metrics = metrics
        self.tracer = tracer
        self._background: set[asyncio.Task[None]] = set()
        self._watchdog = _Watchdog()
        self.launcher = launcher
        self.ensembles = Ensembles(config.ensembles, router, self._forward, self.on_complete, metrics)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        started = time.monotonic()
        headers = header_map(scope)
        request_id = headers.get(b"x-request-id")
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = os.urandom(12).hex().encode()  # unguessable: ids must not reveal traffic
        result = ProxyResult()
        req: ProxyRequest | None = None
        span = self.tracer.start("gateway " + scope["path"], {"http.request_id": request_id.decode()}) \
            if self.tracer else None
        try:
            raw = await read_body(receive, self.limits.max_body_bytes, headers.get(b"content-length"),
                                  body_too_large)
            req = await self._admit(scope, headers, raw, request_id, span, result)
            await self._serve(req, receive, send, result)
        except GatewayError as error:
            result.status = error.status
            if not result.is_started:
                await self._send_error(send, error, request_id, req)
        except ClientDisconnected:
            result.status = 499
        except Exception:
            log.exception("internal error", extra={"fields": {"request_id": request_id.decode("latin-1")}})
            result.status = 500
            if not result.is_started:
                await send_error(send, GatewayError(500, "Internal gateway error.", "server_error", "internal_error"),
                                 [(b"x-request-id", request_id)])
        finally:
            self._finish(scope, req, result, started, request_id, span)

    async def _admit(self, scope: dict[str, Any], headers: dict[bytes, bytes], raw: bytes, request_id: bytes,
                     span: Any, result: ProxyResult) -> ProxyRequest:
        principal = scope.get(INTERNAL_PRINCIPAL)  # set only by the gateway itself (batches/internal.py)
        if principal is None:
            try:
                principal = await self.auth.authenticate(headers.get(b"authorization"))
            except KeyRefused as refused:
                self.metrics.record_key_rejection(refused.principal, refused.reason)
                raise
        route = FORWARDED[scope["path"]]  # the app sends only these paths here
        path = route.upstream_path  # never the client's bytes (request smuggling)
        body = parse_json(raw)
        if not body.keys().isdisjoint(CLIENT_IDENTITY_FIELDS):  # checked inline: rare, and this runs per request
            body, raw = strip_client_identity(body, raw)
        model = validate(path, body, self.limits)
        pool = self.router.resolve(model)
        ensemble: EnsembleConfig | None = None
        if pool is None and (ensemble := self.ensembles.by_name.get(model)) is not None:
            check_request(ensemble, path, body)
            pool = self.router.resolve(ensemble.members[0])
        if pool is None:
            raise not_found(f"The model `{model}` does not exist.", "model_not_found", "model")
        result.model = pool.name if ensemble is None else ensemble.name
        # An ensemble's members are how it is served: the key needs the ensemble's name itself.
        if not (principal.may_use(model) or (ensemble is None and principal.may_use(pool.name))):
            self.metrics.record_key_rejection(principal, "model_not_allowed")
            raise forbidden(f"This key may not use the model `{model}`.")
        extra: list[tuple[bytes, bytes]] = [(b"x-request-id", request_id)]
        if has_limits(principal):
            state = await self._shared(self.limiter.admit(principal), "rate limiter")  # None: fail open
            if state is not None and state.reason is not None:
                self.metrics.rate_limited.labels(state.reason).inc()
                self.metrics.record_key_rejection(principal, state.reason)
                raise refusal(principal, state, self.limits.window_seconds)
            if state is not None:
                extra += limit_headers(principal, state, self.limits.window_seconds)
        is_stream = body.get("stream") is True
        options = body.get("stream_options")
        wants_usage = bool(is_stream and isinstance(options, dict) and options.get("include_usage"))
        session = headers.get(b"x-session-id")
        affinity = None
        if pool.config.strategy == "prefix_affinity":
            affinity = session.decode("latin-1") if session else prompt_text(body, pool.config.prefix_chars)
        priority = _priority(headers.get(b"x-priority"), principal)
        req = ProxyRequest(request_id, path, raw, body, principal, pool, is_stream, wants_usage, affinity, extra,
                           priority=priority, is_idempotent=route.is_idempotent, ensemble=ensemble,
                           upstream_headers=[(TENANT_HEADER, principal.tenant_header),
                                             _PRIORITY_HEADERS[priority]])
        if span is not None:
            req.upstream_headers.append((b"traceparent", self.tracer.traceparent(span)))  # type: ignore[union-attr]
        return req

    async def _serve(self, req: ProxyRequest, receive: Receive, send: Send, result: ProxyResult) -> None:
        if req.ensemble is not None:  # each member takes its own model's slot
            await self._guarded(self.ensembles.serve(req, req.ensemble, send, result), receive, result)
            return
        if not self.router.acquire_slot(req.pool, req.priority):
            self.metrics.shed.labels(req.pool.name, req.priority).inc()
            self.metrics.record_key_rejection(req.principal, "shed")
            raise GatewayError(429, f"The model `{req.pool.name}` is overloaded; retry shortly.",
                               "rate_limit_error", "overloaded", headers=[(b"retry-after", b"1")])
        in_flight = self.metrics.in_flight
        pool_key = (req.pool.name,)
        in_flight.add(pool_key)
        try:
            if self.cache is not None and is_cacheable(req.body):
                tenant = req.principal.tenant or req.principal.id
                req.cache_key = cache_key(req.path.decode(), tenant, req.body)
                if await self._serve_cached(req, send, result, fresh_only=True):
                    return
            try:
                work = self.forwarder.forward(req, send, result) if req.pool.config.launch is None else \
                    self._forward_launched(req, send, result)
                await self._guarded(work, receive, result)
            except GatewayError:
                if req.cache_key is None or result.is_started or not self.config.cache.serve_stale:
                    raise
                if not await self._serve_cached(req, send, result, fresh_only=False):
                    raise
        finally:
            in_flight.add(pool_key, -1)
            self.router.release_slot(req.pool)

    async def _forward_launched(self, req: ProxyRequest, send: Send, result: ProxyResult) -> None:
        """A model loaded on demand: held until loaded, kept loaded until its answer ends."""
        async with self.launcher.lease(req.pool.name):
            await self.forwarder.forward(req, send, result)

    async def _forward(self, req: ProxyRequest, send: Send, result: ProxyResult) -> None:
        if req.pool.config.launch is None:
            await self.forwarder.forward(req, send, result)
        else:
            await self._forward_launched(req, send, result)

    async def _guarded(self, work: Any, receive: Receive, result: ProxyResult) -> None:
        """Runs `work`; cancels it when the client disconnects or the total timeout passes."""
        task = asyncio.current_task()
        guard = _Guard(task, receive, self.config.timeouts.total, asyncio.get_running_loop().time())
        self._watchdog.add(guard)
        try:
            await work
        except asyncio.CancelledError:
            if guard.reason is None:
                raise
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
            if guard.reason == "timeout":
                raise GatewayError(504, "The request took longer than the gateway's total timeout.",
                                   "timeout_error", "timeout") from None
            result.status = 499
        finally:
            self._watchdog.remove(guard)
            guard.close()

    async def _serve_cached(self, req: ProxyRequest, send: Send, result: ProxyResult, fresh_only: bool) -> bool:
        if self.cache is None or req.cache_key is None:
            return False
        hit = await self._shared(self.cache.get(req.cache_key), "cache")
        is_fresh = hit is not None and hit[1] <= self.config.cache.ttl
        if hit is None or (fresh_only and not is_fresh):
            if fresh_only:
                self.metrics.cache.labels("miss").inc()
            return False
        self.metrics.cache.labels("hit" if is_fresh else "stale").inc()
        result.status, result.model, result.is_cache_hit = 200, req.pool.name, True
        state = b"hit" if is_fresh else b"stale"
        self.ledger.add(req.principal.id, req.pool.name, 0, 0, 0)
        result.is_started = True
        await send_bytes(send, 200, hit[0], [*req.extra_headers, (b"x-lmserve-cache", state)])
        return True

    async def on_complete(self, req: ProxyRequest, result: ProxyResult, data: bytes | None) -> None:
        """Usage accounting, once per request; runs before the client's last byte is sent."""
        if result.is_recorded:
            return
        result.is_recorded = True
        prompt, completion, cached = result.usage or (0, 0, 0)
        if result.usage is None and result.is_started and req.is_stream:
            # The stream ended without a usage event (backend broke off or client left): estimate
            # one token per content event and four characters per prompt token.
            completion = result.num_events
            prompt = len(prompt_text(req.body, self.limits.max_prompt_chars)) // 4
        self.ledger.add(req.principal.id, result.model or req.pool.name, prompt, completion, cached)
        if prompt or completion:
            self.metrics.record_tokens(result.model, req.principal, prompt, completion, cached)
            if has_limits(req.principal):
                await self._shared(self.limiter.record_tokens(req.principal, prompt + completion), "rate limiter")
        if data is not None and req.cache_key is not None and self.cache is not None and is_complete_answer(data):
            await self._shared(self.cache.put(req.cache_key, data), "cache")

    async def _shared(self, call: Awaitable[_T], what: str) -> _T | None:
        """Runs a call to shared state (Redis). When it fails, the gateway fails open: limits and
        the cache are skipped for this request, and the failure is logged and counted."""
        try:
            return await call
        except Exception as exc:  # noqa: BLE001 -- any failure of the shared store must fail open
            self.metrics.shared_state_errors.labels(what).inc()
            log.warning("%s unavailable, failing open: %r", what, exc)
            return None

    async def _send_error(self, send: Send, error: GatewayError, request_id: bytes, req: ProxyRequest | None) -> None:
        extra = req.extra_headers if req is not None else [(b"x-request-id", request_id)]
        if isinstance(error, PassThrough):
            await send({"type": "http.response.start", "status": error.status,
                        "headers": response_headers(error.upstream_headers, [
                            *extra, (b"content-length", str(len(error.upstream_body)).encode())])})
            await send({"type": "http.response.body", "body": error.upstream_body})
            return
        await send_error(send, error, extra)

    def _finish(self, scope: dict[str, Any], req: ProxyRequest | None, result: ProxyResult, started: float,
                request_id: bytes, span: Any) -> None:
        elapsed = time.monotonic() - started
        model = result.model or (req.pool.name if req is not None else "-")
        if req is not None and result.is_started and not result.is_recorded:
            # The client left mid-response: account what was streamed (no await: the task is ending).
            task = asyncio.get_running_loop().create_task(self.on_complete(req, result, None))
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)
        metrics = self.metrics
        metrics.requests.add((model, result.backend, str(result.status)))
        model_key = (model,)
        metrics.latency.observe(model_key, elapsed)
        if result.upstream_seconds is not None:
            added = elapsed - result.upstream_seconds
            metrics.added_latency.observe(model_key, added if added > 0.0 else 0.0)
        if result.ttfb is not None:
            metrics.ttfb.observe((model, result.backend), result.ttfb)
        if result.num_retries:
            self.metrics.retries.labels(model).inc(result.num_retries)
        if self.config.access_log:
            usage = result.usage or (None, None, None)
            log.info("request", extra={"fields": {
                "request_id": request_id.decode("latin-1"), "path": scope["path"], "status": result.status,
                "model": model, "backend": result.backend, "duration_ms": round(elapsed * 1000, 3),
                "principal": req.principal.id if req is not None else None, "retries": result.num_retries,
                "prompt_tokens": usage[0], "completion_tokens": usage[1], "cache": result.is_cache_hit}})
        if span is not None:
            span.set_attribute("http.status_code", result.status)
            span.set_attribute("lmserve.model", model)
            span.set_attribute("lmserve.backend", result.backend)
            span.end()


def models_listing(router: Router, principal: Principal, ensembles: Ensembles, launcher: Launcher) -> bytes:
    """Every name a client may send; a model loaded on demand also says whether it is loaded
    (`lmserve_state`: unloaded, loading, loaded or unloading)."""
    names = sorted(set(router.names) | set(router.canaries) | set(ensembles.by_name))
    data: list[dict[str, Any]] = [{"id": n, "object": "model", "created": 0, "owned_by": "lmserve"}
                                  for n in names if principal.may_use(n)]
    for entry in data:
        launched = launcher.models.get(router.names.get(entry["id"], ""))
        if launched is not None:
            entry["lmserve_state"] = launched.state
    return orjson.dumps({"object": "list", "data": data})
