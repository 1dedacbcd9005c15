"""The gateway owns identity: what a client writes about its own tenant or priority never reaches a backend.

The backend learns the caller's tenant and priority class from two headers the gateway sets itself
(`X-Lmserve-Tenant`, `X-Lmserve-Priority`); an lmserve server honours them only on requests carrying
its own API key, which the gateway sends as the backend's `api_key`. The client's `priority` and
`tenant` body fields are removed (vLLM schedules by a body `priority` too), and client headers are
never forwarded (the upstream request is built from scratch). OpenAI's `user` field passes through:
it names an end user for abuse tracking, and no server takes it for a tenant.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson

TENANT_HEADER = b"x-lmserve-tenant"
PRIORITY_HEADER = b"x-lmserve-priority"
CLIENT_IDENTITY_FIELDS = ("priority", "tenant")
"""Body fields a client could use to pick its own scheduling identity."""


def tenant_header_value(tenant: str) -> bytes:
    """The tenant as an `X-Lmserve-Tenant` value: percent-encoded UTF-8, so that a tenant from a JWT
    claim can hold any character without ever writing a control byte into the upstream request."""
    return quote(tenant, safe="").encode("ascii")


def strip_client_identity(body: dict[str, Any], raw: bytes) -> tuple[dict[str, Any], bytes]:
    """The body and its bytes without the client's identity fields; unchanged (no copy) when absent."""
    if body.keys().isdisjoint(CLIENT_IDENTITY_FIELDS):  # one C call: this runs on every request
        return body, raw
    kept = {k: v for k, v in body.items() if k not in CLIENT_IDENTITY_FIELDS}
    return kept, orjson.dumps(kept)
