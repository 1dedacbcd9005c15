"""The web console's static files under `/ui` (lmserve/gateway/ui/: plain ES modules, no build step).

The console is a client of the gateway's own JSON routes (`/v1/*` with an API key, `/admin/*` with
the admin key); this module only serves its files, read once at start-up, with headers that keep a
page holding a key safe: a Content-Security-Policy allowing nothing but this origin (no inline
script or style, no third-party request, no framing, no form submission), `nosniff`, no referrer.
`/ui` and `/ui/` are the page; anything else under `/ui/` is one of the shipped files or a 404.

Invariant: only files present in the package directory at start-up are ever served, by exact name
(no path is joined from client input).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from lmserve.gateway.asgi import Headers, Receive, Send, send_bytes
from lmserve.gateway.errors import GatewayError, not_found

if TYPE_CHECKING:
    from importlib.abc import Traversable

PREFIX = "/ui"
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    b"font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Headers = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    (b"cache-control", b"no-cache"),
]
_CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}


def _load(directory: Traversable) -> dict[str, tuple[bytes, bytes]]:
    files = {}
    for entry in directory.iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if entry.is_file() and suffix in _CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    if "index.html" not in files:
        raise ValueError(f"the console's files are missing from {directory} (a broken install?)")
    return files


class Console:
    """Serves the console's files from memory; `files` maps a file name to (body, content type)."""

    def __init__(self, directory: Traversable | None = None) -> None:
        self.files = _load(directory or resources.files("lmserve.gateway") / "ui")

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await self._error(send, GatewayError(405, f"{scope['method']} {path} is not supported.",
                                                 "invalid_request_error", "method_not_allowed",
                                                 headers=[(b"allow", b"GET, HEAD")]))
            return
        name = path[len(PREFIX):].lstrip("/") or "index.html"
        found = self.files.get(name)
        if found is None:
            await self._error(send, not_found(f"No console file {path}."))
            return
        body, content_type = found
        await send_bytes(send, 200, body, SECURITY_HEADERS, content_type=content_type)

    @staticmethod
    async def _error(send: Send, error: GatewayError) -> None:
        await send_bytes(send, error.status, error.body(), [*error.headers, *SECURITY_HEADERS])
