"""Forwarding one request: attempts over backends and fallback models, then relaying the response.

Rules:
- A request is retried (on another backend, within the retry budget and `max_attempts` per model;
  retries after a refused connection do not spend the budget, as no backend did any work)
  only while no byte has gone to the client: connect errors, retryable statuses (429/502/503/504 by
  default), and a backend that closes or breaks off before its first body byte (streams) or before
  the end of its body (non-streamed responses, which are read whole).
- Timeouts: `timeouts.first_byte` bounds a stream's wait for its first body byte; a non-streamed
  answer comes whole at the end of generation, so it waits up to `timeouts.total` (the handler's
  guard). A request that a backend accepted and then timed out is not retried (the backend may
  still be working on it) unless its route is idempotent and the retry budget allows.
- When a model has no available backend or all its attempts fail, its fallback models are tried.
- Once bytes went to the client, a broken backend ends the stream with an SSE error event.

Time to first byte (`ProxyResult.ttfb`, the `upstream_ttfb` histogram): seconds from sending the
request to the backend's first body byte. For a stream that is its first event (queueing plus
prefill: time to first token); a non-streamed answer's body comes whole once generation ends, so
there it is the whole generation. The `latency` strategy's EWMA takes only streamed samples, so it
always means time to first token.

Upstream time (`ProxyResult.upstream_seconds`, which the handler subtracts from the whole request
to get the `added_latency` histogram): the sum over attempts of the seconds from sending the
request to the backend's last body byte, or to the attempt's failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from lmserve.gateway.auth import Principal
from lmserve.gateway.backends import Backend, ModelPool
from lmserve.gateway.config import GatewayConfig
from lmserve.gateway.errors import GatewayError, sse_error_event, unavailable
from lmserve.gateway.metrics import GatewayMetrics
from lmserve.gateway.model_modes import EnsembleConfig
from lmserve.gateway.redact import Redactor
from lmserve.gateway.router import Router
from lmserve.gateway.sse import EventSplitter, StreamTransform, event_payload, has_usage, parse_usage
from lmserve.gateway.upstream import UpstreamError, UpstreamPool, UpstreamResponse

Send = Callable[[dict[str, Any]], Awaitable[None]]
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date",
                         b"server", b"proxy-connection", b"upgrade", b"te", b"trailer"})


@dataclass(slots=True)
class ProxyRequest:
    """One client request after auth and validation; the body was parsed once, into `body`."""

    request_id: bytes
    path: bytes
    raw_body: bytes
    body: dict[str, Any]
    principal: Principal
    pool: ModelPool
    is_stream: bool
    wants_usage: bool
    affinity_key: str | None
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Headers added to the client response (request id, rate-limit state)."""
    priority: str = "normal"
    upstream_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Headers added to the backend request (trace context)."""
    cache_key: str | None = None
    """Set when the response may be cached."""
    is_idempotent: bool = False
    """The route may be sent again after a backend accepted it and timed out (routes.py)."""
    ensemble: EnsembleConfig | None = None
    """Set when the model asked for is an ensemble (ensemble.py); `pool` is then its first member's."""


@dataclass(slots=True)
class ProxyResult:
    """What happened, for metrics, logs, the ledger and limits. `usage` is (prompt, completion, cached)."""

    status: int = 0
    model: str = ""
    backend: str = "-"
    usage: tuple[int, int, int] | None = None
    num_events: int = 0
    num_retries: int = 0
    ttfb: float | None = None
    upstream_seconds: float | None = None
    """Seconds spent on upstream attempts, summed (see the module docstring); None: no attempt."""
    upstream_done: float | None = None
    """When the current attempt's last upstream byte came (monotonic); None until then."""
    is_cache_hit: bool = False
    is_started: bool = False
    """Response head went to the client."""
    is_recorded: bool = False
    """Usage was accounted (exactly once per request)."""


class _Retry(Exception):
    """This attempt failed before any byte reached the client; try another backend."""

    def __init__(self, status: int, message: str, response: tuple[int, list[tuple[bytes, bytes]], bytes] | None,
                 is_connect: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.response = response
        self.is_connect = is_connect


def response_headers(upstream: list[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # The gateway's own X-Request-ID is in `extra`; the backend's echo of it would be a second one.
    return [(k, v) for k, v in upstream if k not in _HOP_BY_HOP and k != b"x-request-id"] + extra


class Forwarder:
    def __init__(self, config: GatewayConfig, router: Router, upstream: UpstreamPool,
                 redactor: Redactor | None, on_complete: Callable[[ProxyRequest, ProxyResult, bytes | None],
                                                                  Awaitable[None]],
                 metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.timeouts = config.timeouts
        self.retries = config.retries
        self.retry_statuses = frozenset(config.retries.retry_on_status)
        self.router = router
        self.upstream = upstream
        self.redactor = redactor
        self.on_complete = on_complete
        """Called after the last upstream byte and before the client's final byte: records usage."""

    async def forward(self, req: ProxyRequest, send: Send, result: ProxyResult) -> None:
        """Serves `req`; raises GatewayError if nothing could be sent (the caller answers it)."""
        self.router.retry_budget.record_request()
        last: _Retry | None = None
        num_attempts = 0
        for pool in self.router.chain(req.pool):
            body = self._upstream_body(req, pool)
            tried: set[Backend] = set()
            for _ in range(self.retries.max_attempts):
                backend = self.router.pick(pool, tried, req.affinity_key)
                if backend is None:
                    break
                tried.add(backend)
                if not backend.breaker.acquire():
                    continue  # lost the race for a half-open breaker's single trial
                if num_attempts > 0:
                    # A retry after a refused connection is free: no backend did any work.
                    is_free = last is not None and last.is_connect
                    if not is_free and not self.router.retry_budget.try_retry():
                        backend.breaker.cancel()
                        self.metrics.retry_budget_exhausted.inc()
                        return self._give_up(last, budget_spent=True)
                    result.num_retries += 1
                num_attempts += 1
                try:
                    await self._attempt(req, pool, backend, body, send, result)
                except _Retry as retry:
                    last = retry
                    continue
                if pool is not req.pool:
                    self.metrics.fallbacks.labels(req.pool.name, pool.name).inc()
                return None
        return self._give_up(last, budget_spent=False)

    @staticmethod
    def _give_up(last: _Retry | None, budget_spent: bool) -> None:
        if last is not None and last.response is not None:
            raise PassThrough(*last.response)
        if last is None:
            raise unavailable("No healthy backend for this model.")
        status = 504 if last.status == 504 else 502
        code = "retry_budget_exhausted" if budget_spent else "upstream_error"
        raise GatewayError(status, f"Upstream failed: {last}", "upstream_error", code)

    def _upstream_body(self, req: ProxyRequest, pool: ModelPool) -> bytes:
        target = pool.config.upstream_model or pool.name
        inject_usage = req.is_stream and not req.wants_usage
        if target == req.body.get("model") and not inject_usage:
            return req.raw_body
        body = dict(req.body)
        body["model"] = target
        if inject_usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return orjson.dumps(body)

    def _request_headers(self, req: ProxyRequest, backend: Backend) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json"), (b"x-request-id", req.request_id)]
        if backend.auth_header is not None:
            headers.append((b"authorization", backend.auth_header))
        if req.upstream_headers:
            headers += req.upstream_headers
        return headers

    async def _attempt(self, req: ProxyRequest, pool: ModelPool, backend: Backend, body: bytes, send: Send,
                       result: ProxyResult) -> None:
        started = time.monotonic()
        backend.begin()
        outcome: bool | None = None  # None: says nothing about the backend (client went away)
        result.ttfb = result.upstream_done = None
        try:
            try:
                response = await self.upstream.request(backend.url, b"POST", req.path,
                                                       self._request_headers(req, backend), body,
                                                       self.timeouts.connect,
                                                       self.timeouts.first_byte if req.is_stream else None)
            except UpstreamError as exc:
                outcome = False
                raise self._failure(req, exc, "") from None
            try:
                result.model, result.backend = pool.name, backend.url
                if response.status in self.retry_statuses:
                    outcome = response.status == 429  # an overloaded backend is alive
                    raise _Retry(response.status, f"backend answered {response.status}",
                                 await self._read_error(response))
                outcome = False
                if req.is_stream and response.status == 200:
                    backend.breaker.record_answer()
                    await self._relay_stream(req, response, send, result, started)
                else:
                    result.ttfb = time.monotonic() - started
                    await self._relay_whole(req, response, send, result)
                outcome = result.status < 500
            except asyncio.CancelledError:
                outcome = None
                raise
            finally:
                response.release()
        finally:
            done = result.upstream_done if result.upstream_done is not None else time.monotonic()
            result.upstream_seconds = (result.upstream_seconds or 0.0) + done - started
            # Only streamed samples feed the latency EWMA: they measure time to first token.
            backend.end(outcome, result.ttfb if outcome and req.is_stream else None)

    def _failure(self, req: ProxyRequest, exc: UpstreamError, context: str) -> Exception:
        """What an upstream failure before the first client byte becomes: a retry, or (a backend
        that accepted the request, then timed out) a final 504 unless the route is idempotent."""
        if exc.is_timeout and not exc.is_connect and not req.is_idempotent:
            return GatewayError(504, f"The backend sent no first byte within {self.timeouts.first_byte}s "
                                "(timeouts.first_byte); not retried, as it may be working on the request.",
                                "upstream_error", "upstream_timeout")
        return _Retry(504 if exc.is_timeout else 502, f"{context}{exc}", None,
                      is_connect=exc.is_connect and not exc.is_timeout)

    async def _read_error(self, response: UpstreamResponse) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        try:
            return response.status, response.headers, await response.read()
        except UpstreamError:
            return None

    async def _relay_whole(self, req: ProxyRequest, response: UpstreamResponse, send: Send,
                           result: ProxyResult) -> None:
        try:
            data = await response.read()
        except UpstreamError as exc:
            raise _Retry(502, str(exc), None) from None
        result.upstream_done = time.monotonic()
        result.status = response.status
        if response.status == 200 and data[:1] == b"{":
            data = self._account_whole(data, result)
        await self.on_complete(req, result, data if response.status == 200 else None)
        headers = response_headers(response.headers, req.extra_headers)
        headers.append((b"content-length", str(len(data)).encode()))
        result.is_started = True
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def _account_whole(self, data: bytes, result: ProxyResult) -> bytes:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if isinstance(payload, dict):
            result.usage = parse_usage(payload)
            if self.redactor is not None:
                self.redactor.redact_response(payload)
                return orjson.dumps(payload)
        return data

    async def _relay_stream(self, req: ProxyRequest, response: UpstreamResponse, send: Send,
                            result: ProxyResult, started: float) -> None:
        # One first-byte deadline from sending the request, whether the head came late or early.
        remaining = max(0.0, self.timeouts.first_byte - (time.monotonic() - started))
        try:
            first = await response.first_chunk(remaining)
        except UpstreamError as exc:
            raise self._failure(req, exc, "backend broke off before its first byte: ") from None
        if first is None:
            raise _Retry(502, "backend sent an empty stream", None)
        result.ttfb = time.monotonic() - started
        result.status = 200
        headers = response_headers(response.headers, req.extra_headers)
        result.is_started = True
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        transform = None
        if not req.wants_usage or self.redactor is not None:
            transform = StreamTransform(strip_usage=not req.wants_usage,
                                        redactor=self.redactor.stream() if self.redactor else None)
        relay = _StreamRelay(send, transform, result)
        try:
            await relay.push(first)
            async for chunk in response.chunks():
                await relay.push(chunk)
        except UpstreamError as exc:
            result.upstream_done = time.monotonic()
            await relay.finish()
            await self.on_complete(req, result, None)
            await send({"type": "http.response.body", "body": sse_error_event(f"Upstream failed mid-stream: {exc}")})
            result.status = 502
            return
        result.upstream_done = time.monotonic()
        await relay.finish()
        await self.on_complete(req, result, None)
        await send({"type": "http.response.body", "body": b""})


class PassThrough(GatewayError):
    """The last backend answer of a failed request, handed to the client as it was."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(status, "upstream error")
        self.upstream_headers = headers
        self.upstream_body = body


class _StreamRelay:
    """Sends SSE chunks as they come; reads usage; applies the transform when there is one."""

    def __init__(self, send: Send, transform: StreamTransform | None, result: ProxyResult) -> None:
        self.send = send
        self.transform = transform
        self.result = result
        self.splitter = EventSplitter()
        self.template: dict[str, Any] | None = None
        self.held_done = False

    async def push(self, chunk: bytes) -> None:
        had_pending = bool(self.splitter.pending)
        events = self.splitter.feed(chunk)
        self.result.num_events += len(events)
        transform = self.transform
        has_usage_event = False
        for event in events:
            if has_usage(event):
                has_usage_event = True
                payload = event_payload(event)
                if payload is not None:
                    self.result.usage = parse_usage(payload) or self.result.usage
        is_whole_events = not had_pending and not self.splitter.pending
        if transform is None or (transform.redactor is None and not has_usage_event and is_whole_events):
            # Nothing to change in this chunk (the common case): pass the bytes on as they came.
            await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            return
        out = [kept + b"\n\n" for kept in map(self._transform, events) if kept is not None]
        if out:
            await self.send({"type": "http.response.body", "body": b"".join(out), "more_body": True})

    def _transform(self, event: bytes) -> bytes | None:
        transform = self.transform
        if transform is None:
            return event
        if transform.redactor is None:
            # Only the usage chunk changes; other events are not parsed.
            return transform.apply(event, event_payload(event)) if has_usage(event) else event
        if event.startswith(b"data: [DONE]"):
            self.held_done = True  # sent after any text the redactor still holds
            return None
        payload = event_payload(event)
        if payload is not None:
            self.template = payload
        return transform.apply(event, payload)

    async def finish(self) -> None:
        if self.transform is None:
            return
        tail = self.transform.flush(self.template)
        body = (tail + b"\n\n" if tail else b"") + (b"data: [DONE]\n\n" if self.held_done else b"")
        if body:
            await self.send({"type": "http.response.body", "body": body, "more_body": True})
