"""A small fault-injecting OpenAI-compatible server for gateway tests (run as its own process).

    python -m tests.gateway.fake_backend --port 9001 --name a

Chat and text completions, streamed or not, with `usage` (prompt_tokens 10, completion_tokens =
number of content chunks) and `stream_options.include_usage` like OpenAI. Every response carries
`x-backend-name`. Faults are set at run time through `POST /_control` (JSON merged into the state):

  status, fail_count  answer `status` to the next `fail_count` requests (-1: all)
  delay               seconds before answering
  chunk_delay         seconds between streamed chunks
  first_chunk_delay   seconds between a stream's head and its first chunk (queueing + prefill)
  content, chunk_chars  completion text and how many characters go in each chunk
  health, ready       statuses of /health and /ready (ready 404 = no readiness endpoint)
  probe_delay         seconds before /health and /ready answer (a server too busy to answer probes)
  hang_body           answer the head of a non-streamed response, then stall
  finish_reason       the finish reason of every choice ("stop"; "timeout" for a truncated answer)
  cached_tokens       `usage.prompt_tokens_details.cached_tokens` (0: no details, like a server without
                      prefix caching)

With `logprobs` in the request, each chunk of `content` is one token with log-probabilities
(OpenAI's chat or legacy completions layout); its top alternatives are itself and "x".

`GET /_stats` returns counters and the last request's headers and body; `POST /_reset` clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

DEFAULTS = {"status": None, "fail_count": 0, "delay": 0.0, "chunk_delay": 0.0, "content": "Hello from the fake",
            "chunk_chars": 4, "health": 200, "ready": 200, "hang_body": False, "first_chunk_delay": 0.0,
            "finish_reason": "stop", "probe_delay": 0.0, "cached_tokens": 0}


class FakeBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.state = dict(DEFAULTS)
        self.stats: dict = {}
        self.reset()

    def reset(self) -> None:
        self.stats = {"requests": 0, "completions": 0, "streams_started": 0, "streams_finished": 0,
                      "streams_cancelled": 0, "last_headers": {}, "last_body": None, "in_flight": 0,
                      "max_in_flight": 0, "health_probes": 0}

    def headers(self) -> dict[str, str]:
        return {"x-backend-name": self.name}

    async def control(self, request: web.Request) -> web.Response:
        self.state.update(await request.json())
        return web.json_response(self.state)

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.stats, "name": self.name})

    async def post_reset(self, request: web.Request) -> web.Response:
        self.state = dict(DEFAULTS)
        self.reset()
        return web.json_response({"ok": True})

    async def health(self, request: web.Request) -> web.Response:
        self.stats["health_probes"] += 1
        if self.state["probe_delay"]:
            await asyncio.sleep(self.state["probe_delay"])
        return web.json_response({"status": "ok"}, status=self.state["health"])

    async def ready(self, request: web.Request) -> web.Response:
        if self.state["probe_delay"]:
            await asyncio.sleep(self.state["probe_delay"])
        return web.json_response({"status": "ready"}, status=self.state["ready"])

    def _injected_status(self) -> int | None:
        status, count = self.state["status"], self.state["fail_count"]
        if status is None or count == 0:
            return None
        if count > 0:
            self.state["fail_count"] = count - 1
        return int(status)

    async def completion(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        body = await request.json()
        self.stats["last_headers"] = dict(request.headers)
        self.stats["last_body"] = body
        if self.state["delay"]:
            await asyncio.sleep(self.state["delay"])
        status = self._injected_status()
        if status is not None:
            error = {"error": {"message": f"injected {status}", "type": "server_error", "param": None, "code": None}}
            return web.json_response(error, status=status, headers=self.headers())
        self.stats["completions"] += 1
        is_chat = request.path.endswith("chat/completions")
        text = self.state["content"]
        size = max(1, int(self.state["chunk_chars"]))
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        if body.get("stream"):
            return await self._stream(request, body, is_chat, pieces)
        if self.state["hang_body"]:
            return await self._hang(request)
        return web.json_response(self._whole(body, is_chat, text, len(pieces)), headers=self.headers())

    def _whole(self, body: dict, is_chat: bool, text: str, num_chunks: int) -> dict:
        finish = self.state["finish_reason"]
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if is_chat else {"index": 0, "text": text, "finish_reason": finish})
        if body.get("logprobs"):
            size = max(1, int(self.state["chunk_chars"]))
            choice["logprobs"] = _logprobs([text[i:i + size] for i in range(0, len(text), size)], is_chat, 0)
        return {"id": "cmpl-fake", "object": "chat.completion" if is_chat else "text_completion",
                "created": int(time.time()), "model": body.get("model"), "choices": [choice],
                "usage": self._usage(num_chunks), "backend": self.name}

    def _usage(self, num_chunks: int) -> dict:
        usage: dict = {"prompt_tokens": 10, "completion_tokens": num_chunks, "total_tokens": 10 + num_chunks}
        if self.state["cached_tokens"]:
            usage["prompt_tokens_details"] = {"cached_tokens": self.state["cached_tokens"]}
        return usage

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={**self.headers(), "content-type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"id": ')
        await asyncio.sleep(3600)
        return response

    async def _stream(self, request: web.Request, body: dict, is_chat: bool, pieces: list[str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={**self.headers(), "content-type": "text/event-stream"})
        await response.prepare(request)
        self.stats["streams_started"] += 1
        self.stats["in_flight"] += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk" if is_chat else "text_completion",
                "created": int(time.time()), "model": body.get("model")}
        offset = 0
        try:
            if self.state["first_chunk_delay"]:
                await asyncio.sleep(self.state["first_chunk_delay"])
            for i, piece in enumerate(pieces):
                finish = self.state["finish_reason"] if i == len(pieces) - 1 else None
                choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": finish}
                          if is_chat else {"index": 0, "text": piece, "finish_reason": finish})
                if body.get("logprobs"):
                    choice["logprobs"] = _logprobs([piece], is_chat, offset)
                offset += len(piece)
                chunk = {**base, "choices": [choice]}
                if include_usage:
                    chunk["usage"] = None
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if self.state["chunk_delay"]:
                    await asyncio.sleep(self.state["chunk_delay"])
            if include_usage:
                usage = self._usage(len(pieces))
                await response.write(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.stats["streams_finished"] += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.stats["streams_cancelled"] += 1
            raise
        finally:
            self.stats["in_flight"] -= 1
        return response


def _logprobs(tokens: list[str], is_chat: bool, offset: int) -> dict:
    """Log-probabilities of `tokens` in OpenAI's chat layout or the legacy completions one."""
    if is_chat:
        def entry(token: str) -> dict:
            return {"token": token, "logprob": -0.5, "bytes": list(token.encode())}
        return {"content": [{**entry(t), "top_logprobs": [entry(t), {**entry("x"), "logprob": -2.0}]}
                            for t in tokens]}
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
            "top_logprobs": [{t: -0.5, "x": -2.0} for t in tokens], "text_offset": offsets}


def make_app(name: str) -> web.Application:
    fake = FakeBackend(name)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.completion)
    app.router.add_post("/v1/completions", fake.completion)
    app.router.add_get("/health", fake.health)
    app.router.add_get("/ready", fake.ready)
    app.router.add_post("/_control", fake.control)
    app.router.add_get("/_stats", fake.get_stats)
    app.router.add_post("/_reset", fake.post_reset)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    args = parser.parse_args()
    web.run_app(make_app(args.name), host="127.0.0.1", port=args.port, print=None, access_log=None,
                handler_cancellation=True)


if __name__ == "__main__":
    main()
