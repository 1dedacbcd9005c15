"""One request/response exchange on a connection of the gateway's HTTP/1.1 protocol (http11.py):
the ASGI `receive`/`send` pair of one request, and the bytes of its response head.

Invariant: a `Cycle`'s head is written together with its first body message, never alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from lmserve.gateway.errors import error_body
from lmserve.gateway.waiter import Waiter

if TYPE_CHECKING:
    from lmserve.gateway.http11 import HTTP11Protocol

log = logging.getLogger("lmserve.gateway")

_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_ERROR_KINDS = {400: ("invalid_request_error", "malformed_request"), 408: ("invalid_request_error", "request_timeout"),
                431: ("invalid_request_error", "request_header_fields_too_large"),
                500: ("server_error", "internal_error")}
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}

def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def error_response(status: int, message: str) -> bytes:
    """A whole response with an OpenAI error body; the connection closes after it."""
    type_, code = _ERROR_KINDS[status]
    body = error_body(message, type_, code)
    return (status_line(status) + b"content-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class Cycle:
    """One request and its response."""

    __slots__ = ("body_parts", "body_size", "expected_length", "head", "is_body_complete", "is_body_delivered",
                 "is_bodyless", "is_chunked", "is_disconnected", "is_response_complete", "is_response_started",
                 "keep_alive", "proto", "scope", "waiter", "wants_continue")

    def __init__(self, proto: HTTP11Protocol, scope: dict[str, Any], keep_alive: bool, wants_continue: bool) -> None:
        self.proto = proto
        self.scope = scope
        self.keep_alive = keep_alive
        self.wants_continue = wants_continue
        self.is_bodyless = scope["method"] == "HEAD"
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.is_body_complete = False
        self.is_body_delivered = False
        self.is_disconnected = False
        self.is_response_started = False
        self.is_response_complete = False
        self.is_chunked = False
        self.expected_length: int | None = None
        self.head: list[bytes] | None = None
        self.waiter = Waiter(proto.loop)

    async def run(self, app: Callable[..., Any]) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("exception in the gateway's ASGI application")
            self._fail()
            if not isinstance(exc, Exception):
                raise
        else:
            if not self.is_response_complete:
                if self.is_response_started:
                    log.error("the ASGI application returned without completing its response")
                self._fail()

    def _fail(self) -> None:
        """Ends a response that cannot be completed: a 500 when nothing was sent, else a closed connection."""
        if self.is_disconnected or self.is_response_complete:
            return
        self.keep_alive = False
        self.is_response_complete = True
        transport = self.proto.transport
        if not self.is_response_started or self.head is not None:
            transport.write(error_response(500, "Internal gateway error."))
        transport.close()

    # ASGI
    async def receive(self) -> dict[str, Any]:
        if self.wants_continue and not self.is_response_started:
            self.wants_continue = False
            self.proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            if self.is_disconnected:
                return {"type": "http.disconnect"}
            if not self.is_body_delivered and (self.body_parts or self.is_body_complete):
                parts = self.body_parts
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                self.body_parts = []
                self.body_size = 0
                self.is_body_delivered = self.is_body_complete
                self.proto.resume_body()
                return {"type": "http.request", "body": body, "more_body": not self.is_body_complete}
            if self.is_response_complete and (self.is_body_delivered or not self.is_body_complete):
                # Answered: the rest of an unread body will never come (the connection closes).
                return {"type": "http.disconnect"}
            await self.waiter.wait()

    async def send(self, message: dict[str, Any]) -> None:
        proto = self.proto
        if proto.is_write_paused and not self.is_disconnected:
            await proto.drained.wait()
        if self.is_disconnected:
            return
        kind = message["type"]
        if not self.is_response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self.head = self._head(message["status"], message.get("headers", ()))
            self.is_response_started = True
            self.wants_continue = False
            return
        if self.is_response_complete:
            raise RuntimeError(f"unexpected {kind!r} after the response was complete")
        if kind != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
        body: bytes = message.get("body", b"")
        more_body = message.get("more_body", False)
        if self.is_bodyless:
            body = b""  # HEAD, 1xx, 204, 304: nothing may follow the head
        elif not self.is_chunked and self.expected_length is not None:
            if len(body) > self.expected_length:
                raise RuntimeError("response body longer than its content-length")
            self.expected_length -= len(body)
        out = self.head or []
        self.head = None
        if self.is_chunked and not self.is_bodyless:
            if body:
                out += (b"%x\r\n" % len(body), body, b"\r\n")
            if not more_body:
                out.append(b"0\r\n\r\n")
        elif body:
            out.append(body)
        if out:
            proto.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if not more_body:
            if self.expected_length and not self.is_bodyless:
                raise RuntimeError("response body shorter than its content-length")
            self.is_response_complete = True
            proto.on_response_complete(self)

    def _head(self, status: int, headers: Any) -> list[bytes]:
        out = [status_line(status)]
        has_length = has_encoding = has_close = False
        if status < 200 or status in (204, 304):
            self.is_bodyless = True
        for name, value in (*self.proto.server_state.default_headers, *headers):
            lower = self.proto.checked_name(name)
            if _BAD_VALUE.search(value):
                raise RuntimeError(f"invalid value for response header {lower!r}")
            if lower == b"content-length":
                has_length = True
                self.expected_length = int(value)
            elif lower == b"transfer-encoding":
                has_encoding = True
                self.is_chunked = value.lower() == b"chunked"
                if not self.is_chunked:
                    self.keep_alive = False  # a body in another coding ends when the connection closes
            elif lower == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                has_close = True
            out += (lower, b": ", value, b"\r\n")
        if not (has_length or has_encoding or self.is_bodyless):
            if self.scope["http_version"] == "1.1":
                self.is_chunked = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # an HTTP/1.0 body without a length ends when the connection closes
        if not self.keep_alive and not has_close:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        return out
