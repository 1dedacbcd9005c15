"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`.

Every refusal the gateway makes goes through `GatewayError`, so no path answers with a bare 500.
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """A refusal with an HTTP status and an OpenAI error body; `headers` go on the response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str = "Invalid or missing API key.") -> GatewayError:
    return GatewayError(401, message, "authentication_error", "invalid_api_key")


def forbidden(message: str, code: str = "model_not_allowed") -> GatewayError:
    return GatewayError(403, message, "permission_error", code)


def not_found(message: str, code: str = "not_found", param: str | None = None) -> GatewayError:
    return GatewayError(404, message, "invalid_request_error", code, param)


def unavailable(message: str, code: str = "no_healthy_backend") -> GatewayError:
    return GatewayError(503, message, "service_unavailable", code, headers=[(b"retry-after", b"1")])


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """The event sent to a client whose stream broke after bytes were already sent."""
    body = error_body(message, "upstream_error", code)
    return b"data: " + body + b"\n\ndata: [DONE]\n\n"
