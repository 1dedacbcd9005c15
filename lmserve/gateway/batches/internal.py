"""Batch requests through the gateway's own request path, as the principal that created the batch.

A batch line is handed to the same `ProxyHandler` that serves clients, as an in-process ASGI call:
routing, fallbacks, retries, the key's scopes, rate limits and budget, shedding, metrics and the
usage ledger all apply exactly as to a client request. It runs at the `low` priority class (the
gateway sheds it first and the backend's engine schedules it after interactive requests).

The principal is re-read from the key store (at most every `key_cache_ttl` seconds) before each
request, so a key revoked or expired after its batch was created stops it: its remaining requests
get the 401 a client would get. A batch created with a JWT runs as that token's identity.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from lmserve.gateway.auth import ANONYMOUS, Authenticator, Principal
from lmserve.gateway.errors import GatewayError, unauthorized
from lmserve.gateway.handler import INTERNAL_PRINCIPAL, ProxyHandler

Answer = tuple[int, dict[bytes, bytes], bytes]
"""(HTTP status, response headers by lower-case name, response body)."""
BATCH_PRIORITY = b"low"


def principal_snapshot(principal: Principal) -> dict[str, Any]:
    """What a batch stores of its creator (JSON): enough to run as it later."""
    return {"id": principal.id, "name": principal.name, "tenant": principal.tenant,
            "models": sorted(principal.models) if principal.models is not None else None, "rpm": principal.rpm,
            "tpm": principal.tpm, "budget_tokens": principal.budget_tokens, "priority": principal.priority}


def owner_of(principal: Principal) -> str:
    """Files and batches belong to the caller's tenant, or to the key itself when it has none."""
    return "tenant:" + principal.tenant if principal.tenant else "key:" + principal.id


def _from_snapshot(snapshot: dict[str, Any]) -> Principal:
    models = snapshot.get("models")
    return Principal(snapshot["id"], snapshot["name"], snapshot.get("tenant"),
                     frozenset(models) if models is not None else None, snapshot.get("rpm"), snapshot.get("tpm"),
                     snapshot.get("budget_tokens"), snapshot.get("priority", "normal"))


class InternalClient:
    """Sends one request through the handler as a stored principal; never raises for a refusal."""

    def __init__(self, handler: ProxyHandler, auth: Authenticator, key_cache_ttl: float) -> None:
        self.handler = handler
        self.auth = auth
        self.ttl = key_cache_ttl
        self._principals: dict[str, tuple[Principal | GatewayError, float]] = {}

    async def principal(self, snapshot: dict[str, Any]) -> Principal:
        """The creator as it is now: a key re-read from the store (401 when revoked, expired or gone)."""
        key_id: str = snapshot["id"]
        if key_id == ANONYMOUS.id:
            return ANONYMOUS
        if key_id.startswith("jwt:"):
            return _from_snapshot(snapshot)
        cached = self._principals.get(key_id)
        if cached is None or time.monotonic() >= cached[1]:
            cached = (await self._load_key(key_id), time.monotonic() + self.ttl)
            self._principals[key_id] = cached
        if isinstance(cached[0], GatewayError):
            raise cached[0]
        return cached[0]

    async def _load_key(self, key_id: str) -> Principal | GatewayError:
        record = await asyncio.to_thread(self.auth.store.get, key_id)
        if record is None:
            return unauthorized("The API key that created this batch no longer exists.")
        if record.revoked_at is not None:
            return unauthorized("The API key that created this batch has been revoked.")
        if record.is_expired(dt.datetime.now(dt.timezone.utc)):
            return unauthorized("The API key that created this batch has expired.")
        rpm = record.rpm if record.rpm is not None else self.auth.default_limits[0]
        tpm = record.tpm if record.tpm is not None else self.auth.default_limits[1]
        return Principal(record.id, record.name, record.tenant, record.models, rpm, tpm, record.budget_tokens,
                         record.priority)

    async def post(self, snapshot: dict[str, Any], path: str, raw: bytes) -> Answer:
        """POSTs `raw` to `path` (a forwarded route) as the snapshot's principal, at low priority."""
        try:
            principal = await self.principal(snapshot)
        except GatewayError as error:
            return error.status, {}, error.body()
        scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                             (b"x-priority", BATCH_PRIORITY)],
                 INTERNAL_PRINCIPAL: principal}
        is_sent = False
        never = asyncio.Event()  # a batch never disconnects; the handler's watcher waits here until cancelled

        async def receive() -> dict[str, Any]:
            nonlocal is_sent
            if is_sent:
                await never.wait()
            is_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        status = 0
        headers: dict[bytes, bytes] = {}
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.update((k.lower(), v) for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.handler(scope, receive, send)
        return status, headers, b"".join(chunks)
