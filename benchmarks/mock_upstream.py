"""The benchmark's fast mock OpenAI upstream: a raw asyncio protocol on uvloop answering canned
responses, so the upstream costs as little CPU as possible and the gateways are what is measured.

    python benchmarks/mock_upstream.py --port 9000

`POST .../completions` answers a fixed chat completion with `usage`; with `"stream": true` in the
body it answers 8 SSE chunks (plus a usage chunk when `include_usage` is asked) and `[DONE]`.
`GET /health`, `/ready`, `/v1/models` answer 200.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

_COMPLETION = (b'{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"mock",'
               b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, this is a mock."},'
               b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}')
_MODELS = b'{"object":"list","data":[{"id":"mock","object":"model","created":0,"owned_by":"mock"}]}'
_OK = b'{"status":"ok"}'


def _stream_body(include_usage: bool) -> bytes:
    events = []
    for i in range(8):
        finish = b'"stop"' if i == 7 else b"null"
        events.append(b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1700000000,'
                      b'"model":"mock","choices":[{"index":0,"delta":{"content":"tok' + str(i).encode()
                      + b' "},"finish_reason":' + finish + b"}]}\n\n")
    if include_usage:
        events.append(b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1700000000,'
                      b'"model":"mock","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":8,'
                      b'"total_tokens":20}}\n\n')
    events.append(b"data: [DONE]\n\n")
    body = b"".join(events)
    return (b"%x\r\n" % len(body)) + body + b"\r\n0\r\n\r\n"


def _response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


_RESP_COMPLETION = _response(_COMPLETION)
_RESP_MODELS = _response(_MODELS)
_RESP_OK = _response(_OK)
_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
_RESP_STREAM = _SSE_HEAD + _stream_body(False)
_RESP_STREAM_USAGE = _SSE_HEAD + _stream_body(True)


class MockProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1 with just enough parsing: head up to CRLFCRLF, body by content-length."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            index = lower.find(b"content-length:")
            if index >= 0:
                length = int(lower[index + 15:].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(self._answer(head, body))  # type: ignore[union-attr]

    @staticmethod
    def _answer(head: bytes, body: bytes) -> bytes:
        if head.startswith(b"POST"):
            if b'"stream":true' in body or b'"stream": true' in body:
                return _RESP_STREAM_USAGE if b"include_usage" in body else _RESP_STREAM
            return _RESP_COMPLETION
        if b"/v1/models" in head:
            return _RESP_MODELS
        return _RESP_OK


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(MockProtocol, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
