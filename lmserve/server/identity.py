"""Who a request is accounted to and how urgent it is: tenant and priority, from a trusted source only.

Identity is the gateway's (docs/operations.md, "Identity"): it authenticates the caller and sends
the key's tenant and priority class in `X-Lmserve-Tenant` and `X-Lmserve-Priority`. This server
honours those headers only when it has an API key, so that every /v1 request proved it comes from
the gateway (or another holder of that key). What a client writes itself (`priority` and `tenant` in
the body, `X-Priority` and `X-Tenant`) is ignored unless the server runs with
`trust_client_identity`, because a client that sets its own priority can preempt everyone and one that
picks its tenant can reset its fair share or read another tenant's prefix cache. OpenAI's `user` is an
end-user id for abuse tracking: it is logged, never used as the tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from starlette.requests import Request

from lmserve.server.errors import bad_request
from lmserve.server.protocol import GenerationFields
from lmserve.server.settings import ServerOptions

PRIORITY_CLASSES = {"high": -1, "normal": 0, "low": 1}
"""The one priority vocabulary of gateway and server: a key's class and the engine priority it runs
at (lower runs first under the priority policy; the gateway also sheds low before normal before high)."""
TENANT_HEADER = "x-lmserve-tenant"
PRIORITY_HEADER = "x-lmserve-priority"
MAX_TENANT_CHARS = 200


@dataclass(frozen=True)
class Identity:
    """What the engine schedules a request by: `priority` (engine integer) and `tenant` ("" for none)."""

    priority: int = 0
    tenant: str = ""


def parse_priority(value: str, param: str) -> int:
    """A priority class name (high, normal, low) or an engine integer; 400 for anything else."""
    text = value.strip().lower()
    if text in PRIORITY_CLASSES:
        return PRIORITY_CLASSES[text]
    try:
        return int(text)
    except ValueError:
        raise bad_request(f"{param} must be high, normal, low or an integer, got {value[:40]!r}",
                          param="priority") from None


def _tenant(value: str, param: str) -> str:
    if len(value) > MAX_TENANT_CHARS:
        raise bad_request(f"{param} is longer than {MAX_TENANT_CHARS} characters", param="tenant")
    return value


def is_gateway_trusted(options: ServerOptions) -> bool:
    """True when the identity headers are honoured: every /v1 request carries the server's own key."""
    return options.api_key is not None or options.trust_client_identity


def identity_of(body: GenerationFields, http: Request, options: ServerOptions) -> Identity:
    """The request's tenant and priority: the gateway's headers first, then (only when the server
    trusts its clients) what the client wrote; otherwise the defaults (no tenant, normal)."""
    headers = http.headers
    tenant: str | None = None
    priority: int | None = None
    if is_gateway_trusted(options):
        if (value := headers.get(TENANT_HEADER)) is not None:
            tenant = _tenant(unquote(value), "X-Lmserve-Tenant")  # the gateway percent-encodes it
        if (value := headers.get(PRIORITY_HEADER)) is not None:
            priority = parse_priority(value, "X-Lmserve-Priority")
    if options.trust_client_identity:
        if tenant is None:
            value = body.tenant if body.tenant is not None else headers.get("x-tenant")
            tenant = None if value is None else _tenant(value, "tenant")
        if priority is None:
            if body.priority is not None:
                priority = parse_priority(str(body.priority), "priority")
            elif (value := headers.get("x-priority")) is not None:
                priority = parse_priority(value, "X-Priority")
    return Identity(priority if priority is not None else 0, tenant or "")
