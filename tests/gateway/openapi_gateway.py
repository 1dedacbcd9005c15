"""An OpenAPI 3 description of the gateway's client-facing routes, for schemathesis (test_fuzz.py).

The gateway is a raw ASGI application with no framework to derive a schema from, so this one is
written by hand from routes.py, validation.py and app.py: the request fields the gateway itself
checks, with their ranges, and the error body every refusal carries.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": "string", "nullable": True},
                   "code": {"type": "string", "nullable": True}}}}}

_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 32768},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "n": {"type": "integer", "minimum": 1, "maximum": 128},
    "seed": {"type": "integer"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "user": {"type": "string"},
}

_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]}}}

_MODEL = {"type": "string", "enum": ["m", "alias-m", "missing-model"]}


def _post(body: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": {"description": "A completion (JSON, or SSE when streamed)."},
                          "default": {"description": "An OpenAI error.",
                                      "content": {"application/json": {"schema": _ERROR}}}}}


def _get(description: str) -> dict[str, Any]:
    return {"responses": {"200": {"description": description},
                          "default": {"description": "An OpenAI error.",
                                      "content": {"application/json": {"schema": _ERROR}}}}}


def gateway_openapi() -> dict[str, Any]:
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": _MODEL, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1, "maxItems": 4},
        **_SAMPLING}}
    completion = {"type": "object", "required": ["model", "prompt"], "properties": {
        "model": _MODEL, "prompt": {"oneOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 16}]},
        **_SAMPLING}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "lmserve gateway", "version": "1"},
        "paths": {
            "/v1/chat/completions": {"post": _post(chat)},
            "/v1/completions": {"post": _post(completion)},
            "/v1/models": {"get": _get("The models this key may use.")},
            "/health": {"get": _get("Liveness.")},
            "/ready": {"get": _get("Readiness.")},
            "/metrics": {"get": _get("Prometheus metrics.")},
            "/admin/backends": {"get": _get("Pools and backend state (admin key).")},
        },
    }
