"""Streaming clients for benchmarks/chaos.py: every request's outcome, classified from the raw bytes.

A request ends in exactly one `Outcome.kind`:
  completed   200, a stream that ended with `data: [DONE]` after no error event
  refused     429 or 503 with a `Retry-After` header, before any body (how fast: `seconds`)
  error_event 200, a stream carrying `data: {"error": ...}` (a clean, explained end)
  cut         200, a stream that ended without [DONE] and without an error event, or a data line
              that is not JSON: the silent truncation the chaos targets say must never happen
  gateway_5xx any other 5xx (a 503 without Retry-After included)
  http_4xx    any other 4xx
  transport   the connection failed or timed out before a status (the gateway itself unreachable)
  left        the client disconnected on purpose mid-stream (scenario c)
`usage` is the final usage chunk's tokens (the stream asks for `include_usage`), None when absent.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

PROMPT_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "rain", "falls")


@dataclass
class Outcome:
    kind: str
    status: int | None
    seconds: float
    """From sending to the end of the response (to the status for refusals)."""
    admitted_at: float | None = None
    """`time.monotonic()` when a 200 head arrived (the gateway admitted the request), else None."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    has_usage: bool = False
    detail: str = ""


@dataclass
class LoadSpec:
    """A bounded load: `num_requests` streams, at most `concurrency` at once, or arriving at `rate`/s."""

    num_requests: int
    concurrency: int
    max_tokens: int
    rate: float | None = None
    """Open-loop arrivals per second (Poisson, seeded) instead of a closed loop of `concurrency`."""
    leave_share: float = 0.0
    """Share of clients that disconnect after `leave_after_chunks` chunks."""
    leave_after_chunks: int = 3
    seed: int = 0
    timeout: float = 120.0
    """Per request, so a hung stream ends as `transport` instead of blocking the run."""


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(8, 24)))


def _classify_stream(lines: list[str]) -> tuple[str, str]:
    """(kind, detail) of a finished 200 stream from its `data:` payloads."""
    saw_done = saw_error = False
    for payload in lines:
        if payload == "[DONE]":
            saw_done = True
            continue
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            return "cut", f"unparseable data line {payload[:80]!r}"
        if isinstance(event, dict) and "error" in event:
            saw_error = True
    if saw_error:
        return "error_event", ""
    return ("completed", "") if saw_done else ("cut", "ended without [DONE] or an error event")


async def one_request(client: httpx.AsyncClient, url: str, key: str, model: str, max_tokens: int,
                      prompt: str, leave_after: int | None, timeout: float) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    try:
        return await asyncio.wait_for(_stream(client, url, key, body, leave_after, start), timeout)
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        return Outcome("transport", None, time.monotonic() - start, detail=repr(exc)[:120])


async def _stream(client: httpx.AsyncClient, url: str, key: str, body: dict, leave_after: int | None,
                  start: float) -> Outcome:
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            await response.aread()
            return _refusal(response, time.monotonic() - start)
        admitted_at = time.monotonic()
        payloads: list[str] = []
        usage: dict | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payloads.append(line[5:].strip())
            if leave_after is not None and len(payloads) >= leave_after:
                return Outcome("left", 200, time.monotonic() - start, admitted_at=admitted_at)
            usage = _usage(payloads[-1]) or usage
    kind, detail = _classify_stream(payloads)
    outcome = Outcome(kind, 200, time.monotonic() - start, admitted_at=admitted_at, detail=detail)
    if usage is not None:
        outcome.has_usage = True
        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
    return outcome


def _usage(payload: str) -> dict | None:
    if not payload.startswith("{") or '"usage"' not in payload:
        return None
    try:
        usage = json.loads(payload).get("usage")
    except json.JSONDecodeError:
        return None
    return usage if isinstance(usage, dict) else None


def _refusal(response: httpx.Response, seconds: float) -> Outcome:
    status = response.status_code
    detail = response.text[:160]
    if status in (429, 503) and response.headers.get("retry-after"):
        return Outcome("refused", status, seconds, detail=detail)
    if status >= 500:
        return Outcome("gateway_5xx", status, seconds, detail=detail)
    return Outcome("http_4xx", status, seconds, detail=detail)


async def run_load(url: str, key: str, model: str, spec: LoadSpec,
                   stop: asyncio.Event | None = None, result: LoadResult | None = None) -> LoadResult:
    """Sends `spec`'s requests and waits for all of them; `stop` ends the arrivals early. Outcomes are
    appended to `result` (a new one by default) as they end, so a caller can watch progress."""
    rng = random.Random(spec.seed)
    result = LoadResult() if result is None else result
    gate = asyncio.Semaphore(spec.concurrency)
    limits = httpx.Limits(max_connections=spec.concurrency + 8, max_keepalive_connections=spec.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(spec.timeout, connect=5.0)) as client:
        async def send(prompt: str, leave_after: int | None) -> None:
            async with gate:
                result.outcomes.append(await one_request(client, url, key, model, spec.max_tokens, prompt,
                                                         leave_after, spec.timeout))

        tasks = []
        for _ in range(spec.num_requests):
            if spec.rate is None:  # closed loop: create a request only when a slot is free, so `stop` acts now
                await gate.acquire()
                gate.release()
            if stop is not None and stop.is_set():
                break
            leave = spec.leave_after_chunks if rng.random() < spec.leave_share else None
            tasks.append(asyncio.create_task(send(_prompt(rng), leave)))
            if spec.rate is not None:
                await asyncio.sleep(rng.expovariate(spec.rate))
            else:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    return result
