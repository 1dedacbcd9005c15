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
    inter_token: list[float] = field(default_factory=list)
    """Seconds between streamed chunks after the first."""
    error: str | None = None
    token_ids: list[int] | None = None


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
    started = time.perf_counter()
    try:
        async with session.post(target.base_url.rstrip("/") + "/completions", data=orjson.dumps(body),
                                headers=target.headers()) as response:
            if response.status != 200:
                text = (await response.text())[:300]
                return RequestResult(False, response.status, latency=time.perf_counter() - started, error=text)
            if target.stream:
                return await _read_stream(response, started)
            payload = orjson.loads(await response.read())
            usage = payload.get("usage") or {}
            return RequestResult(True, 200, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                                 latency=time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return RequestResult(False, 0, latency=time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")


async def _read_stream(response: aiohttp.ClientResponse, started: float) -> RequestResult:
    result = RequestResult(True, 200)
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
        if chunk.get("choices"):
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
