"""The gateway as one raw ASGI application (no framework routing on the hot path).

`Gateway` owns every component, creates the I/O-bound ones at lifespan start-up and closes them at
shutdown; nothing lives in module globals. Routes: the OpenAI routes of routes.py (`POST
/v1/chat/completions` and `/v1/completions` proxied; any other `/v1/` path is a 404), `GET /v1/models`,
`/v1/files` and `/v1/batches` (batches/), `/admin/*`, the web console under `/ui` (console.py),
`GET /health` (liveness), `GET /ready` (readiness: 503 while draining or when no model has an
available backend), `GET /metrics`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lmserve.gateway.admin import AdminAPI
from lmserve.gateway.asgi import Receive, Send, header_map, send_bytes, send_error, send_json
from lmserve.gateway.auth import Authenticator
from lmserve.gateway.backends import breaker_state_value
from lmserve.gateway.batches.service import BatchService, is_batch_path
from lmserve.gateway.cache import MemoryCache, RedisCache, ResponseCache
from lmserve.gateway.config import GatewayConfig
from lmserve.gateway.console import PREFIX as CONSOLE_PREFIX
from lmserve.gateway.console import Console
from lmserve.gateway.discovery import BackendDiscovery, Resolver, SystemResolver
from lmserve.gateway.errors import GatewayError, not_found
from lmserve.gateway.handler import ProxyHandler, models_listing
from lmserve.gateway.health import HealthChecker
from lmserve.gateway.history import TrafficHistory
from lmserve.gateway.keystore import KeyStore
from lmserve.gateway.launcher import Launcher
from lmserve.gateway.ledger import UsageLedger
from lmserve.gateway.metrics import GatewayMetrics
from lmserve.gateway.proxy import Forwarder
from lmserve.gateway.ratelimit import MemoryRateLimiter, RateLimiter
from lmserve.gateway.redact import Redactor
from lmserve.gateway.router import Router
from lmserve.gateway.routes import FORWARDED, LOCAL
from lmserve.gateway.status import StatusView
from lmserve.gateway.tracing import Tracer, tracer_from_env
from lmserve.gateway.upstream import UpstreamPool

log = logging.getLogger("lmserve.gateway")
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"


class Gateway:
    """Invariant: after `startup()` every component is live; `is_draining` only goes False -> True."""

    def __init__(self, config: GatewayConfig, tracer: Tracer | None = None, resolver: Resolver | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics(config.metrics_max_keys)
        if config.tls_certfile:
            self.metrics.set_tls_certificate(config.tls_certfile)
        self.router = Router(config)
        self.upstream = UpstreamPool()
        redaction = config.redaction
        self.redactor = Redactor(redaction.patterns, redaction.replacement, redaction.max_match_chars,
                                 redaction.named_patterns) if redaction.patterns or redaction.named_patterns else None
        self.tracer = tracer
        self.is_draining = False
        self.redis: Any = None
        self.store: KeyStore | None = None
        self.discovery = BackendDiscovery(self.router, config.health, resolver or SystemResolver())
        self.health = HealthChecker(self.upstream, config.health, self.router.all_backends)
        self.handler: ProxyHandler | None = None
        self.launcher = Launcher(config, self.router, self.upstream, self.metrics)
        self.admin: AdminAPI | None = None
        self.ledger: UsageLedger | None = None
        self.limiter: RateLimiter | None = None
        self.cache: ResponseCache | None = None
        self.batches: BatchService | None = None
        self.console = Console()
        self.history = TrafficHistory(self.metrics)

    async def startup(self) -> None:
        config = self.config
        self.store = await asyncio.to_thread(KeyStore, config.database_url)
        store = self.store
        auth = Authenticator(store, config.key_cache_ttl, config.jwt, config.auth_required,
                             (config.limits.default_rpm, config.limits.default_tpm))

        async def seed_budget(principal_id: str) -> int:
            return await asyncio.to_thread(store.total_tokens, principal_id)

        if config.redis_url:
            import redis.asyncio as aioredis

            from lmserve.gateway.redis_ratelimit import RedisRateLimiter

            # Bounded waits: a stuck Redis must not stall requests (limits then count locally, the cache misses).
            self.redis = aioredis.from_url(config.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            await self.redis.ping()
            self.limiter = RedisRateLimiter(self.redis, config.limits.window_seconds, seed_budget,
                                            self._shared_state_error)
        else:
            self.limiter = MemoryRateLimiter(config.limits.window_seconds, seed_budget)
        if config.cache.enabled:
            max_age = config.cache.ttl + config.cache.stale_ttl
            self.cache = RedisCache(self.redis, max_age) if self.redis is not None else MemoryCache(
                config.cache.max_entries, max_age)
        self.ledger = UsageLedger(store, config.ledger_flush_interval)
        forwarder = Forwarder(config, self.router, self.upstream, self.redactor, self._on_complete, self.metrics)
        self.handler = ProxyHandler(config, self.router, forwarder, auth, self.limiter, self.cache, self.ledger,
                                    self.metrics, self.tracer, self.launcher)
        self.admin = AdminAPI(config.admin_key, store, auth, self.router, self.launcher,
                              StatusView(self.router, self.upstream, self.history))
        self.launcher.start()
        self.ledger.start()
        if config.batch.enabled:
            self.batches = await BatchService.start(config, store.engine, self.handler, auth)
            self.admin.batch_store = self.batches.api.store
        self.history.start(lambda: list(self.router.pools))
        await self.discovery.start()
        self.health.start()

    def _shared_state_error(self, exc: Exception) -> None:
        self.metrics.shared_state_errors.labels("rate limiter").inc()
        log.warning("rate limiter: Redis unavailable, counting in this replica: %r", exc)

    async def _on_complete(self, req: Any, result: Any, data: bytes | None) -> None:
        if self.handler is not None:
            await self.handler.on_complete(req, result, data)

    async def shutdown(self) -> None:
        if self.batches is not None:
            await self.batches.close()  # first: its requests in flight still use the handler and the ledger
        await self.launcher.close()
        await self.discovery.close()
        await self.health.close()
        await self.history.close()
        if self.ledger is not None:
            await self.ledger.close()
        if self.limiter is not None:
            await self.limiter.close()
        self.upstream.close()
        if self.store is not None:
            self.store.close()
        if self.tracer is not None:
            self.tracer.shutdown()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.handler
            if handler is not None and scope["method"] == "POST" and scope["path"] in FORWARDED:
                await handler(scope, receive, send)  # the hot path, tested first
            else:
                await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if self.batches is not None and is_batch_path(path):
            await self.batches(scope, receive, send)
        elif path.startswith("/v1/"):
            route = FORWARDED.get(path) or LOCAL.get(path)
            if route is None:
                await send_error(send, not_found(f"No route {method} {path}."))
            elif method == "GET" and path == "/v1/models" and self.handler is not None:
                await self._models(scope, send)
            else:
                await send_error(send, GatewayError(405, f"{method} {path} is not supported.",
                                                    "invalid_request_error", "method_not_allowed"))
        elif path.startswith("/admin/") and self.admin is not None:
            await self.admin(scope, receive, send)
        elif path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/"):
            await self.console(scope, receive, send)
        elif path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/ready":
            await self._ready(send)
        elif path == "/metrics":
            self._refresh_gauges()
            await send_bytes(send, 200, self.metrics.render(), content_type=_PROMETHEUS)
        else:
            await send_error(send, not_found(f"No route {method} {path}."))

    async def _models(self, scope: dict[str, Any], send: Send) -> None:
        if self.handler is None:
            return
        try:
            principal = await self.handler.auth.authenticate(header_map(scope).get(b"authorization"))
        except GatewayError as error:
            await send_error(send, error)
            return
        await send_bytes(send, 200, models_listing(self.router, principal, self.handler.ensembles, self.launcher))

    async def _ready(self, send: Send) -> None:
        if self.is_draining:
            await send_json(send, 503, {"status": "draining"})
            return
        available = {pool.name: len(pool.available()) for pool in self.router.pools.values()}
        # A model the gateway loads on demand can take requests while unloaded: they wait for it.
        is_ready = self.handler is not None and (not available or any(available.values()) or bool(self.launcher.models))
        await send_json(send, 200 if is_ready else 503,
                        {"status": "ready" if is_ready else "no available backend", "models": available})

    def _refresh_gauges(self) -> None:
        # Cleared first: a backend removed (by discovery or the admin API) must not linger as a series.
        self.metrics.breaker_state.clear()
        self.metrics.backend_healthy.clear()
        for pool, backend in self.router.all_backends():
            self.metrics.breaker_state.labels(pool.name, backend.url).set(breaker_state_value(backend))
            self.metrics.backend_healthy.labels(pool.name, backend.url).set(1 if backend.is_available() else 0)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(config: GatewayConfig) -> Gateway:
    """The ASGI app for `config`, with tracing when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    return Gateway(config, tracer_from_env())
