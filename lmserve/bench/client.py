"""Sends one completion request and times what the user feels: first token, gaps, end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from lmserve.bench.workload import RequestSpec


@dataclass
class RequestResult:
    ok: bool
    status: int
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    """Seconds from sending to the first streamed token."""
    latency: float = 0.0
    """Seconds from sending to the end of the response."""
    inter_token: list[float] = field(default_factory=list)
    """Seconds between streamed chunks after the first."""
    error: str | None = None
    token_ids: list[int] | None = None
    started: float = 0.0
    """time.perf_counter() when the request was sent (the run's clock: see RunResult.started)."""


@dataclass
class Target:
    base_url: str
    model: str
    api_key: str | None = None
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    extra: dict = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


async def send(session: aiohttp.ClientSession, target: Target, spec: RequestSpec) -> RequestResult:
    body = {
        "model": target.model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "temperature": target.temperature,
        "stream": target.stream,
        **({"ignore_eos": True} if target.ignore_eos else {}),
        **({"stream_options": {"include_usage": True}} if target.stream else {}),
        **target.extra,
    }
    path = "/completions"
    if spec.messages is not None:
        path = "/chat/completions"
        del body["prompt"]
        body["messages"] = list(spec.messages)
    started = time.perf_counter()
    try:
        async with session.post(target.base_url.rstrip("/") + path, data=orjson.dumps(body),
                                headers=target.headers()) as response:
            if response.status != 200:
                text = (await response.text())[:300]
                return RequestResult(False, response.status, latency=time.perf_counter() - started,
                                     started=started, error=text)
            if target.stream:
                return await _read_stream(response, started)
            payload = orjson.loads(await response.read())
            usage = payload.get("usage") or {}
            return RequestResult(True, 200, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                                 latency=time.perf_counter() - started, started=started)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return RequestResult(False, 0, latency=time.perf_counter() - started, started=started,
                             error=f"{type(exc).__name__}: {exc}")


def _carries_output(choices: list[dict]) -> bool:
    """Whether a streamed chunk holds generated output. A chat stream opens with a role-only delta
    (content "") that must not count as the first token; a text completion's chunks all do."""
    delta = choices[0].get("delta")
    if delta is None:
        return True
    return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"))


async def _read_stream(response: aiohttp.ClientResponse, started: float) -> RequestResult:
    result = RequestResult(True, 200, started=started)
    last: float | None = None
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = orjson.loads(data)
        if "error" in chunk:
            result.ok, result.error = False, str(chunk["error"].get("message"))
            break
        now = time.perf_counter()
        if chunk.get("choices") and _carries_output(chunk["choices"]):
            if result.ttft is None:
                result.ttft = now - started
            elif last is not None:
                result.inter_token.append(now - last)
            last = now
        usage = chunk.get("usage")
        if usage:
            result.prompt_tokens = usage.get("prompt_tokens", 0)
            result.output_tokens = usage.get("completion_tokens", 0)
    result.latency = time.perf_counter() - started
    return result
