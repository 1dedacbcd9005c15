"""The FastAPI application of `lmserve serve`."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.server.chat import create_chat_completion
from lmserve.server.completions import create_completion
from lmserve.server.errors import APIError, from_validation_errors, internal_error, unauthorized
from lmserve.server.logs import request_id_var
from lmserve.server.metrics import GENERATION_PATHS, ResponseWatch
from lmserve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from lmserve.server.serving import json_response
from lmserve.server.state import Phase, ServerState

logger = logging.getLogger("lmserve.server")


class RequestContext:
    """Pure ASGI middleware: request id in and out, body size limit (413), API key on /v1 (401)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.options.api_key
        self.api_key = key.encode() if key else None
        self.limit = state.options.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = (headers.get(b"x-request-id") or b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        try:
            await self._handle(scope, receive, send, headers, request_id)
        finally:
            request_id_var.reset(token)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, headers: dict, request_id: str) -> None:
        watch = ResponseWatch()
        try:
            await self._respond(scope, receive, send, headers, request_id, watch)
        finally:  # error statuses of generation routes count here; Accounting counts the rest
            metrics = self.state.metrics
            if metrics is not None and watch.status is not None and watch.status >= 400 \
                    and scope["path"] in GENERATION_PATHS:
                metrics.observe_failure(watch.status, watch.reason())

    async def _respond(self, scope: Scope, receive: Receive, send: Send, headers: dict, request_id: str,
                       watch: ResponseWatch) -> None:
        async def send_with_id(message: Message) -> None:
            watch.see(message)
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        error = self._check(scope, headers)
        if error is not None:
            await error.response()(scope, receive, send_with_id)
            return
        body = await self._read_body(receive)
        if body is None:
            await self._too_large().response()(scope, receive, send_with_id)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect remains to be seen

        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_with_id(message)

        try:
            await self.app(scope, replay, send_tracked)
        except Exception:  # never a traceback to the client; the log line carries the request id
            logger.exception("unexpected error")
            if not started:
                await internal_error(request_id).response()(scope, receive, send_with_id)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole request body, or None when it exceeds the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check(self, scope: Scope, headers: dict) -> APIError | None:
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return self._too_large()
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.api_key):
                return unauthorized()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than {self.limit} bytes.", code="request_too_large")


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.load_task = asyncio.create_task(state.load())
        yield
        if state.engine is not None:
            await state.engine.shutdown()

    app = FastAPI(title="lmserve", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(RequestContext, state=state)
    _add_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, state)

    @app.get("/v1/models")
    async def models() -> Response:
        card = ModelCard(id=state.model_name, max_model_len=state.max_model_len or None)
        return json_response(ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health() -> Response:
        """Liveness: the process answers and, once loaded, the engine loop is alive."""
        dead = state.phase is Phase.FAILED or (state.engine is not None and not state.engine.is_alive
                                               and state.phase is not Phase.DRAINING)
        return json_response({"status": "dead" if dead else "ok"}, 503 if dead else 200)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: loaded, warmed up, not draining, engine alive."""
        is_alive = state.engine is not None and state.engine.is_alive
        is_ready = state.phase is Phase.READY and is_alive
        status = "dead" if state.phase is Phase.READY and not is_alive else state.phase.value
        return json_response({"status": status}, 200 if is_ready else 503)

    @app.get("/v1/status")
    async def status() -> Response:
        return json_response(_status(state))

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _status(state: ServerState) -> dict[str, Any]:
    info: dict[str, Any] = {"state": state.phase.value, "model": state.model_name, "in_flight": state.num_in_flight}
    if state.load_error:
        info["error"] = state.load_error
    if state.engine is not None:
        stats = state.engine.latest_stats
        info.update(
            running=stats.num_running, waiting=stats.num_waiting, kv_cache_usage=round(stats.kv_cache_usage, 4),
            kv_cache_blocks=stats.num_blocks, max_model_len=state.max_model_len,
            prefix_cache_hit_rate=round(stats.prefix_cache_hits / stats.prefix_cache_queries, 4)
            if stats.prefix_cache_queries else 0.0,
            engine_alive=state.engine.is_alive, sampling_defaults=state.sampling_defaults,
        )
        if state.engine.info is not None and state.engine.info.device.startswith("cuda"):
            info["device_memory_bytes"] = {"allocated": stats.device_memory_allocated,
                                           "reserved": stats.device_memory_reserved}
    return info


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> Response:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def invalid_model(_: Request, exc: ValidationError) -> Response:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return APIError(exc.status_code, str(exc.detail), code=kind).response()

