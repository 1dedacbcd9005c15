"""A raw HTTP/1.1 backend that records the request line of every request it parses.

Used where a test must see exactly what bytes the gateway wrote upstream (request smuggling): an
ordinary framework would hide a second request inside one connection's stream. It runs on a
thread of the test process, answers every parsed request with a small chat completion (keep-alive),
and `/health` and `/ready` with 200. `extra_response` lets a test make it send bytes after a
response (an unsolicited second response), to check that the gateway drops such a connection;
`is_closing_unanswered` makes it close the connection on every completion request without a reply.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httptools
import orjson

from tests.services import free_port


def _response(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def completion(text: str) -> bytes:
    return orjson.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


class RecordingBackend:
    """`request_lines` lists (method, target) of every request parsed, probes included."""

    def __init__(self) -> None:
        self.request_lines: list[tuple[bytes, bytes]] = []
        self.extra_response: bytes = b""
        self.is_closing_unanswered = False
        self.lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def completions(self) -> list[tuple[bytes, bytes]]:
        """Request lines other than health probes."""
        with self.lock:
            return [line for line in self.request_lines if line[1] not in (b"/health", b"/ready")]

    def serve(self, conn: socket.socket) -> None:
        backend = self

        class Handler:
            def __init__(self) -> None:
                self.url = b""

            def on_url(self, url: bytes) -> None:
                self.url += url

            def on_message_complete(self) -> None:
                method = parser.get_method()
                with backend.lock:
                    backend.request_lines.append((method, self.url))
                is_probe = self.url in (b"/health", b"/ready")
                if backend.is_closing_unanswered and not is_probe:
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                out = _response(b'{"status":"ok"}' if is_probe else completion("recorded"))
                if not is_probe:
                    out += backend.extra_response
                conn.sendall(out)
                self.url = b""

        parser = httptools.HttpRequestParser(Handler())
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError:
                    return


@contextmanager
def recording_backend() -> Iterator[RecordingBackend]:
    backend = RecordingBackend()

    class _Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    class _Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            backend.serve(self.request)

    server = _Server(("127.0.0.1", backend.port), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
