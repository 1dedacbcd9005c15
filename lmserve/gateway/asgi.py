"""Small ASGI helpers shared by the gateway's handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from lmserve.gateway.errors import GatewayError, bad_request

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"


class ClientDisconnected(Exception):
    """The client went away before the request body was read."""


def header_map(scope: dict[str, Any]) -> dict[bytes, bytes]:
    """Request headers by lower-case name (ASGI servers already lower-case them); last one wins."""
    return dict(scope["headers"])


async def read_body(receive: Receive, limit: int, declared: bytes | None,
                    too_large: Callable[[int], GatewayError]) -> bytes:
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(limit)
        except ValueError:
            raise bad_request("Invalid Content-Length header.") from None
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected()
    body = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def send_bytes(send: Send, status: int, body: bytes, headers: Headers | None = None,
                     content_type: bytes = JSON) -> None:
    out = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        out += headers
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: Any, headers: Headers | None = None) -> None:
    await send_bytes(send, status, orjson.dumps(payload), headers)


async def send_error(send: Send, error: GatewayError, headers: Headers | None = None) -> None:
    await send_bytes(send, error.status, error.body(), [*error.headers, *(headers or [])])
