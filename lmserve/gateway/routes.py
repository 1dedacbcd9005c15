"""The OpenAI routes the gateway serves: the one allow-list of what may reach a backend.

A request is forwarded only when its (percent-decoded) path is exactly one of `FORWARDED`; the
backend then receives the route's own `upstream_path` bytes, never bytes the client wrote, so no
spelling of a path (encoded CR/LF, spaces, `..`) can change the upstream request line. Adding a
route is one entry here (and its body check in validation.py, when it has one).

Invariant: every `upstream_path` is a constant made of URL path characters only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    """One route clients may call through the gateway."""

    method: str
    """The HTTP method clients use."""
    upstream_path: bytes
    """The path written into the backend's request line."""
    is_idempotent: bool
    """Safe to send again after a backend accepted it and then timed out (retry rules)."""


CHAT_COMPLETIONS = Route("POST", b"/v1/chat/completions", is_idempotent=False)
COMPLETIONS = Route("POST", b"/v1/completions", is_idempotent=False)
MODELS = Route("GET", b"/v1/models", is_idempotent=True)

FORWARDED: dict[str, Route] = {
    "/v1/chat/completions": CHAT_COMPLETIONS,
    "/v1/completions": COMPLETIONS,
}
"""Routes proxied to a model's backends, by path (POST, with a JSON body naming the model)."""

LOCAL: dict[str, Route] = {"/v1/models": MODELS}
"""Routes the gateway answers itself (the model list comes from its own config)."""
