"""Ensemble routes: one model name whose requests fan out to several models; one answer comes back.

Rules (`EnsembleConfig.rule`):
- `first` (hedging for tail latency): the first member to finish with a 200 answers; the others
  are cancelled at once. Cancelling closes their upstream connections, so their servers abort them.
- `logprob`: every member runs to its end and the answer with the highest mean token
  log-probability wins. The members are asked for log-probabilities; the client gets them only if
  it asked.

Cost: each member is a request of its own to its model (routing, retries, breakers and the model's
load shedding apply per member) and is charged to the key: the tokens its backend reported, or for
a member cancelled mid-answer one completion token per streamed event and four prompt characters
per prompt token (the gateway's estimate for any broken-off stream). A member whose backend had not
begun to answer is charged nothing. The client's `usage` is the sum over members: what the key paid.
`lmserve_ensemble` in the answer names the winner and what each member did.

The members are streamed from their backends, whatever the client asked, so that a cancelled
member's tokens can be counted; the client gets one whole JSON answer (an ensemble does not stream:
`stream: true` is refused with 400), and only one choice (`n` > 1 is refused).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import orjson

from lmserve.gateway.asgi import send_bytes
from lmserve.gateway.errors import GatewayError, bad_request
from lmserve.gateway.metrics import GatewayMetrics
from lmserve.gateway.model_modes import EnsembleConfig
from lmserve.gateway.proxy import PassThrough, ProxyRequest, ProxyResult, Send
from lmserve.gateway.router import Router
from lmserve.gateway.routes import CHAT_COMPLETIONS, COMPLETIONS
from lmserve.gateway.sse import DONE, EventSplitter, event_payload

CHAT_PATH = CHAT_COMPLETIONS.upstream_path
COMPLETIONS_PATH = COMPLETIONS.upstream_path


def check_request(ensemble: EnsembleConfig, path: bytes, body: dict[str, Any]) -> None:
    """Raises a 400 for what an ensemble cannot answer."""
    if path not in (CHAT_PATH, COMPLETIONS_PATH):
        raise bad_request(f"The ensemble `{ensemble.name}` answers only chat and text completions.", "model")
    if body.get("stream") is True:
        raise bad_request(f"The ensemble `{ensemble.name}` returns one whole answer; send `stream: false`.",
                              "stream")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"The ensemble `{ensemble.name}` returns one choice; `n` must be 1.", "n")


@dataclass
class _Answer:
    """One member's streamed answer, put back together (choice 0)."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    error_body: bytes = b""
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    chat_logprobs: list[Any] = field(default_factory=list)
    text_logprobs: dict[str, list[Any]] = field(default_factory=dict)
    first: dict[str, Any] | None = None
    splitter: EventSplitter = field(default_factory=EventSplitter)

    async def send(self, message: dict[str, Any]) -> None:
        """The ASGI `send` the forwarder writes the member's response to."""
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
            return
        body = message.get("body", b"")
        if self.status != 200:
            self.error_body += body
            return
        for event in self.splitter.feed(body):
            if not event.startswith(DONE):
                payload = event_payload(event)
                if payload is not None:
                    self._add(payload)

    def _add(self, payload: dict[str, Any]) -> None:
        if self.first is None:
            self.first = payload
        for choice in payload.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(piece, str):
                self.text.append(piece)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            self._add_logprobs(choice.get("logprobs"))

    def _add_logprobs(self, logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        content = logprobs.get("content")
        if isinstance(content, list):  # chat layout
            self.chat_logprobs += content
            self.logprobs += [t["logprob"] for t in content if isinstance(t, dict) and _finite(t.get("logprob"))]
            return
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):  # legacy completions layout
            if isinstance(logprobs.get(key), list):
                self.text_logprobs.setdefault(key, []).extend(logprobs[key])
        self.logprobs += [v for v in logprobs.get("token_logprobs") or () if _finite(v)]

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else -math.inf


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class _Member:
    model: str
    req: ProxyRequest
    result: ProxyResult = field(default_factory=ProxyResult)
    answer: _Answer = field(default_factory=_Answer)
    error: GatewayError | None = None
    outcome: str = "cancelled"


class Ensembles:
    """Serves requests whose model is an ensemble; see the module docstring."""

    def __init__(self, ensembles: list[EnsembleConfig], router: Router,
                 forward: Callable[[ProxyRequest, Send, ProxyResult], Awaitable[None]],
                 on_complete: Callable[[ProxyRequest, ProxyResult, bytes | None], Awaitable[None]],
                 metrics: GatewayMetrics) -> None:
        self.by_name = {e.name: e for e in ensembles}
        self.router = router
        self.forward = forward
        """The handler's forwarding (a model loaded on demand is held until loaded)."""
        self.on_complete = on_complete
        self.metrics = metrics

    async def serve(self, req: ProxyRequest, ensemble: EnsembleConfig, send: Send, result: ProxyResult) -> None:
        wants_logprobs = bool(req.body.get("logprobs"))
        members = [self._member(req, ensemble, name) for name in ensemble.members]
        tasks = {asyncio.ensure_future(self._run(m)): m for m in members}
        winner: _Member | None = None
        try:
            pending = set(tasks)
            while pending and not (winner is not None and ensemble.rule == "first"):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    member = tasks[task]
                    if member.outcome == "answered" and (winner is None or (
                            ensemble.rule == "logprob" and member.answer.mean_logprob > winner.answer.mean_logprob)):
                        winner = member
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for member in members:
                await self._charge(member)
        for member in members:
            outcome = "won" if member is winner else member.outcome
            self.metrics.ensemble_members.labels(ensemble.name, member.model, outcome).inc()
        if winner is None:
            _raise_first_failure(members)
        await self._answer(req, ensemble, winner, members, wants_logprobs, send, result)

    def _member(self, req: ProxyRequest, ensemble: EnsembleConfig, name: str) -> _Member:
        pool = self.router.resolve(name)
        if pool is None:  # members are checked against the config at load
            raise GatewayError(500, f"ensemble member `{name}` has no pool", "server_error", "internal_error")
        body = dict(req.body)
        body["model"] = name
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if ensemble.rule == "logprob":
            asked = body.get("logprobs")
            is_count = isinstance(asked, int) and not isinstance(asked, bool) and asked >= 1
            body["logprobs"] = True if req.path == CHAT_PATH else (asked if is_count else 1)
        sub = replace(req, raw_body=orjson.dumps(body), body=body, pool=pool, is_stream=True, wants_usage=True, cache_key=None,
                      extra_headers=[], ensemble=None)
        return _Member(pool.name, sub)

    async def _run(self, member: _Member) -> None:
        """One member through its model's shedding, routing and retries; never raises but on cancel."""
        req = member.req
        if not self.router.acquire_slot(req.pool, req.priority):
            member.error = GatewayError(429, f"The model `{req.pool.name}` is overloaded; retry shortly.",
                                        "rate_limit_error", "overloaded")
            member.outcome = "failed"
            return
        try:
            await self.forward(req, member.answer.send, member.result)
            member.outcome = "answered" if member.answer.status == 200 and member.answer.finish_reason else "failed"
        except GatewayError as error:
            member.error, member.outcome = error, "failed"
        finally:
            self.router.release_slot(req.pool)

    async def _charge(self, member: _Member) -> None:
        """A member cut off before its usage event is charged the gateway's estimate for a broken-off
        stream (the handler's `on_complete`); one whose backend had not begun to answer, nothing."""
        result = member.result
        if result.is_recorded:
            return
        if not result.is_started:
            result.is_recorded = True
            return
        await self.on_complete(member.req, result, None)

    async def _answer(self, req: ProxyRequest, ensemble: EnsembleConfig, winner: _Member, members: list[_Member],
                      wants_logprobs: bool, send: Send, result: ProxyResult) -> None:
        answer = winner.answer
        usage = [sum(m.result.usage[i] for m in members if m.result.usage) for i in range(3)]
        choice: dict[str, Any] = {"index": 0, "finish_reason": answer.finish_reason, "logprobs": None}
        text = "".join(answer.text)
        if req.path == CHAT_PATH:
            choice["message"] = {"role": "assistant", "content": text}
            if wants_logprobs:
                choice["logprobs"] = {"content": answer.chat_logprobs}
        else:
            choice["text"] = text
            if wants_logprobs:
                choice["logprobs"] = answer.text_logprobs
        first = answer.first or {}
        body = {
            "id": first.get("id", "ens-" + req.request_id.decode()),
            "object": "chat.completion" if req.path == CHAT_PATH else "text_completion",
            "created": first.get("created", int(time.time())), "model": ensemble.name, "choices": [choice],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": usage[0] + usage[1],
                      **({"prompt_tokens_details": {"cached_tokens": usage[2]}} if usage[2] else {})},
            "lmserve_ensemble": {"rule": ensemble.rule, "winner": winner.model, "members": [{
                "model": m.model, "outcome": "won" if m is winner else m.outcome,
                "prompt_tokens": m.result.usage[0] if m.result.usage else 0,
                "completion_tokens": m.result.usage[1] if m.result.usage else 0,
                **({"mean_logprob": m.answer.mean_logprob}
                   if ensemble.rule == "logprob" and m.outcome == "answered" else {})} for m in members]},
        }
        result.status, result.backend, result.usage = 200, winner.result.backend, (usage[0], usage[1], usage[2])
        result.is_recorded = True  # each member was charged on its own
        result.is_started = True
        await send_bytes(send, 200, orjson.dumps(body), [*req.extra_headers,
                                                         (b"x-lmserve-ensemble-winner", winner.model.encode())])


def _raise_first_failure(members: list[_Member]) -> NoReturn:
    """No member answered: the first failure in member order goes to the client."""
    for member in members:
        if member.error is not None:
            raise member.error
        answer = member.answer
        if answer.status and answer.status != 200:
            raise PassThrough(answer.status, answer.headers, answer.error_body)
    raise GatewayError(502, "No member of the ensemble finished its answer.", "upstream_error", "upstream_error")
