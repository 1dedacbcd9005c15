"""OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, for every failure."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class APIError(Exception):
    """A failure to report to the client with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.body()), status_code=self.status, headers=self.headers, media_type="application/json"
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """The first problem pydantic found, phrased for a user, with the field as `param`."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return bad_request("The request body is not valid JSON.", code="invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: {param}" if param else "The request body is missing."
    elif param:
        message = f"Invalid value for {param}: {message}"
    return bad_request(message, param=param)


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
    )


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def overloaded(message: str, retry_after: float) -> APIError:
    seconds = max(1, int(round(retry_after)))
    return APIError(429, message, type="rate_limit_error", code="engine_overloaded",
                    headers={"Retry-After": str(seconds)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable",
                    headers={"Retry-After": "1"})


def queue_timeout(message: str) -> APIError:
    """A request that was never started: it waited past the queue timeout (or could no longer meet
    its deadline). 503 with Retry-After like any other capacity refusal: nothing was generated, so
    retrying (here later, or on another server) is safe."""
    return APIError(503, message, type="service_unavailable", code="queue_timeout", headers={"Retry-After": "1"})


def internal_error(request_id: str) -> APIError:
    return APIError(500, f"Internal server error (request id {request_id}).", type="server_error",
                    code="internal_error")
