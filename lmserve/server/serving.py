"""What completions and chat completions share: checks, accounting, streaming, disconnects."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response

from lmserve.engine.async_engine import EngineDeadError
from lmserve.engine.errors import EngineOverloaded
from lmserve.engine.grammar import GrammarError
from lmserve.engine.sampling_params import SamplingParams, StructuredOutputs
from lmserve.server.errors import (
    APIError,
    bad_request,
    model_not_found,
    overloaded,
    queue_timeout,
    unavailable,
)
from lmserve.server.generation import Generation, RequestTimedOut
from lmserve.server.logs import log_request
from lmserve.server.protocol import GenerationFields, PromptTokensDetails, Usage
from lmserve.server.state import ServerState

logger = logging.getLogger("lmserve.server")
T = TypeVar("T")


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise model_not_found(model)


def max_tokens_for(state: ServerState, prompt_len: int, requested: int | None) -> int:
    """The output budget; 400 in OpenAI's words when prompt plus output cannot fit."""
    limit = state.max_model_len
    if requested is not None and prompt_len + requested > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if prompt_len >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens, and the prompt has {prompt_len}.",
            param="messages" if requested is None else "prompt",
            code="context_length_exceeded",
        )
    return limit - prompt_len if requested is None else requested


def sampling_params(
    state: ServerState, body: GenerationFields, max_tokens: int, logprobs: int | None,
    prompt_logprobs: int | None = None, structured: StructuredOutputs | None = None,
) -> SamplingParams:
    try:
        params = body.sampling_params(max_tokens, logprobs, prompt_logprobs, state.sampling_defaults, structured)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    engine = state.engine
    vocab = engine.info.limits.vocab_size if engine is not None and engine.info is not None else None
    if vocab is not None and params.logit_bias and max(params.logit_bias) >= vocab:
        raise bad_request(f"logit_bias: token id {max(params.logit_bias)} is outside the vocabulary [0, {vocab})",
                          "logit_bias")
    return params


def new_request_id(prefix: str) -> str:
    """A fresh, unguessable id for the engine and the response `id`. The client's X-Request-ID is a
    correlation id only (logs, echoed header): two requests may share it, engine ids never."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_of(generations: list[Generation]) -> Usage:
    prompt = sum(len(g.prompt_token_ids) for g in generations)
    completion = sum(g.num_completion_tokens for g in generations)
    cached = sum(g.num_cached_tokens for g in generations)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def chunk_usage(options: Any, generations: list[Generation]) -> Callable[[], dict[str, Any] | None]:
    """The `usage` of a stream's content chunks when the client asked for usage: null, or with
    `continuous_usage_stats` the counts so far (vLLM's extension; the last chunk has the totals either way)."""
    if options is None or not (options.include_usage and options.continuous_usage_stats):
        return lambda: None
    return lambda: usage_of(generations).model_dump()


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


COMPLETE_FINISH_REASONS = frozenset({"stop", "length"})
"""Finish reasons of a request that got its whole answer (the others: timeout, abort)."""


@dataclass
class Accounting:
    """Counts a request in flight from `begin()` to `end()`, which records its metrics and log line.

    Metrics by outcome: a request whose every choice finished with stop/length counts in
    `request_success{finished_reason}`; any other end counts in `request_failure{status, reason}`,
    here when the client gets no error status (a disconnect, an error event in a stream already
    answered 200) and in the server's middleware when it does (so that refusals before a request
    reaches the engine count the same way).
    """

    state: ServerState
    generations: list[Generation] = field(default_factory=list)
    tenant: str = ""
    priority: int = 0
    started: float = field(default_factory=time.monotonic)

    def begin(self) -> Accounting:
        self.state.request_started()
        return self

    def end(self, error: BaseException | None = None, is_answered_with_error: bool = False) -> None:
        """`is_answered_with_error`: `error` becomes the HTTP response, which the middleware counts."""
        reason = None
        if isinstance(error, APIError):
            status, reason = error.status, error.code or error.type
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            status, reason = 499, "client_disconnected"  # client closed the request
        else:
            status, reason = (200, None) if error is None else (500, "internal_error")
        self.state.request_ended()
        self._record(status, None if is_answered_with_error else reason)

    def _record(self, status: int, failure: str | None) -> None:
        latency = time.monotonic() - self.started
        reasons = [r for g in self.generations for r in g.finish_reasons]
        finish = ",".join(sorted({r or "abort" for r in reasons})) or None
        first = min((g.first_token_time for g in self.generations if g.first_token_time), default=None)
        ttft = None if first is None else first - self.started
        queue = max((g.queue_seconds for g in self.generations if g.queue_seconds is not None), default=None)
        usage = usage_of(self.generations) if self.generations else None
        metrics = self.state.metrics
        is_complete = status == 200 and bool(reasons) and all(r in COMPLETE_FINISH_REASONS for r in reasons)
        if metrics is not None and usage is not None and is_complete:
            metrics.observe_request(
                usage.prompt_tokens, usage.completion_tokens, finish or "abort", latency, ttft, queue,
                [gap for g in self.generations for gap in g.inter_token_seconds],
            )
        elif metrics is not None and (failure is not None or status == 200):
            metrics.observe_failure(status, failure or finish or "abort")
        cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
        log_request(
            logger, model=self.state.model_name, tenant=self.tenant, priority=self.priority, status=status,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            generation_tokens=usage.completion_tokens if usage else 0,
            cached_tokens=cached, queue_time=queue, ttft=ttft, latency=round(latency, 6), finish_reason=finish,
        )


async def respond(
    http: Request,
    accounting: Accounting,
    stream: bool,
    events: Callable[[], AsyncIterator[bytes]],
    collect: Callable[[], Awaitable[Response]],
) -> Response:
    """Admits every generation, then streams SSE events or answers once everything is collected.

    A refusal at admission is an HTTP error even for streams; an error after the first streamed
    byte becomes an SSE error event (then `[DONE]`). A queue timeout (no token was generated) is a
    503 `queue_timeout` error, or that error event once a stream has started: never a choice that
    finished with reason `timeout`. A client that disconnects aborts its requests.
    """
    accounting.begin()
    try:
        await start_all(accounting.generations)
        if not stream:
            try:
                response = await until_disconnect(http, collect())
            except EngineDeadError as exc:
                raise unavailable(str(exc)) from None
            except RequestTimedOut as exc:
                raise queue_timeout(str(exc)) from None
            accounting.end()
            return response
    except BaseException as exc:
        accounting.end(exc, is_answered_with_error=not isinstance(exc, asyncio.CancelledError))
        raise

    async def body() -> AsyncIterator[bytes]:
        error: BaseException | None = None
        try:
            async for chunk in events():
                yield chunk
        except (EngineDeadError, RuntimeError, RequestTimedOut) as exc:
            # The stream has answered 200: the failure is told in an error event before [DONE].
            error = queue_timeout(str(exc)) if isinstance(exc, RequestTimedOut) else unavailable(str(exc))
            yield sse(error.body())
        except BaseException as exc:
            error = exc
            raise
        finally:
            for generation in accounting.generations:
                await generation.close()
            accounting.end(error)
        yield SSE_DONE

    return EventStreamResponse(body())


class EventStreamResponse(Response):
    """Server-sent events that stop the moment the client disconnects.

    The body iterator is always closed (so its `finally` aborts the engine requests at once),
    whether the stream ended, the client went away, or a write failed.
    """

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        # No content-length: the body is streamed until the last event.
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        streaming = asyncio.ensure_future(self._stream(send))

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            streaming.cancel()

        watcher = asyncio.ensure_future(disconnected())
        try:
            await streaming
        except (asyncio.CancelledError, OSError):
            pass  # the client went away; the iterator is closed below
        finally:
            watcher.cancel()
            await self.events.aclose()  # type: ignore[attr-defined]

    async def _stream(self, send: Any) -> None:
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def engine_error(exc: Exception) -> APIError | None:
    """The HTTP error for what the engine raised when a request was submitted; None if unexpected."""
    if isinstance(exc, GrammarError):
        return bad_request(str(exc), param=exc.param)
    if isinstance(exc, EngineOverloaded):
        return overloaded(str(exc), exc.retry_after or 1.0)
    if isinstance(exc, EngineDeadError):
        return unavailable(str(exc))
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return None


async def start_all(generations: list[Generation]) -> None:
    """Submits every generation; if one is refused, the others are aborted and the refusal raised."""
    try:
        for generation in generations:
            await generation.start()
    except Exception as exc:
        for generation in generations:
            await generation.close()
        mapped = engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None


async def until_disconnect(http: Request, work: Awaitable[T]) -> T:
    """Runs `work`; if the client goes away first, cancels it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise asyncio.CancelledError("client disconnected")
    return task.result()
