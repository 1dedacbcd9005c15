"""Admin API under `/admin/*`, behind the admin key (`Authorization: Bearer <admin_key>`).

  GET    /admin/keys                  list keys (never plaintext)
  POST   /admin/keys                  create {name, models?, rpm?, tpm?, budget_tokens?, tenant?,
                                      priority?, expires_at? (ISO 8601)} -> the key, shown once
  DELETE /admin/keys/{id}             revoke (effective on this gateway at once)
  GET    /admin/usage[?key_id=...]    ledger totals per key and model
  GET    /admin/usage/series[?bucket=hour|day&buckets=N&key_id=...]
                                      the same per hour or day (UTC), the last N buckets (24 hours)
  GET    /admin/backends              pools and backend state
  POST   /admin/backends              add {model, url, weight?, api_key?}
  POST   /admin/backends/drain        {model, url}: no new requests, in-flight ones finish
  POST   /admin/backends/undrain      {model, url}: a drained backend takes new requests again
  POST   /admin/backends/remove       {model, url} (also DELETE /admin/backends with that body)
  GET    /admin/health                backend health, readiness and breaker states
  GET    /admin/batches[?limit=50]    every key's batch jobs, newest first, with their owner
  GET    /admin/models                on-demand models (launch): state, pinned, in flight
  POST   /admin/models/{name}/{action}  load (waits until ready), unload, pin, unpin
  GET    /admin/status                models and backends with their servers' load (queue, KV cache)
                                      and the last minutes of traffic (status.py; the console's view)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from lmserve.gateway.asgi import Receive, Send, header_map, read_body, send_json
from lmserve.gateway.auth import Authenticator
from lmserve.gateway.batches.api import page_limit
from lmserve.gateway.batches.store import BatchStore
from lmserve.gateway.config import BackendConfig
from lmserve.gateway.errors import GatewayError, bad_request, not_found, unauthorized
from lmserve.gateway.keystore import KeyStore
from lmserve.gateway.launcher import Launcher
from lmserve.gateway.router import Router
from lmserve.gateway.usage_series import usage_series
from lmserve.gateway.validation import body_too_large, parse_json


class AdminAPI:
    def __init__(self, admin_key: str | None, store: KeyStore, auth: Authenticator, router: Router,
                 launcher: Launcher,
                 status: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> None:
        self.admin_key = admin_key.encode() if admin_key else None
        self.store = store
        self.auth = auth
        self.router = router
        self.launcher = launcher
        self.status = status
        self.batch_store: BatchStore | None = None
        """Set once the batch service has started (config.batch.enabled)."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            headers = header_map(scope)
            self._check_key(headers.get(b"authorization"))
            raw = await read_body(receive, 1 << 20, headers.get(b"content-length"), body_too_large)
            body = parse_json(raw) if raw else {}
            query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
            status, payload = await self._route(scope["method"], scope["path"], body, query)
        except GatewayError as error:
            await send_json(send, error.status, {"error": {"message": error.message, "type": error.type,
                                                           "param": error.param, "code": error.code}},
                            error.headers)
            return
        await send_json(send, status, payload)

    def _check_key(self, authorization: bytes | None) -> None:
        if self.admin_key is None:
            raise GatewayError(404, "The admin API is off (no admin key configured).", "invalid_request_error",
                               "not_found")
        token = authorization[7:].strip() if authorization and authorization[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(token, self.admin_key):
            raise unauthorized("Invalid admin key.")

    async def _route(self, method: str, path: str, body: dict[str, Any],
                     query: dict[str, str]) -> tuple[int, Any]:
        parts = path.rstrip("/").split("/")[2:]  # after "/admin"
        if parts == ["keys"] and method == "GET":
            return 200, {"data": [k.as_dict() for k in await asyncio.to_thread(self.store.list_keys)]}
        if parts == ["keys"] and method == "POST":
            return 201, await self._create_key(body)
        if len(parts) == 2 and parts[0] == "keys" and method == "DELETE":
            return await self._revoke(parts[1])
        if parts == ["batches"] and method == "GET":
            return 200, {"data": await self._batches(query)}
        if parts == ["usage"] and method == "GET":
            return 200, {"data": await asyncio.to_thread(self.store.usage, query.get("key_id"))}
        if parts == ["usage", "series"] and method == "GET":
            return 200, {"data": await self._usage_series(query)}
        if parts == ["backends"] and method == "GET":
            return 200, self._backends()
        if parts == ["health"] and method == "GET":
            return 200, self._backends()
        if parts == ["models"] and method == "GET":
            return 200, {"models": self.launcher.states()}
        if len(parts) == 3 and parts[0] == "models" and method == "POST":
            if parts[1] not in self.launcher.models:
                raise not_found(f"No on-demand model `{parts[1]}` (only models with `launch` load and unload).")
            if parts[2] not in ("load", "unload", "pin", "unpin"):
                raise bad_request(f"Unknown action `{parts[2]}`: load, unload, pin or unpin.")
            return 200, await self.launcher.admin(parts[1], parts[2])
        if parts == ["status"] and method == "GET" and self.status is not None:
            return 200, await self.status()
        if parts[:1] == ["backends"] and method in ("POST", "DELETE"):
            return self._change_backend(parts[1:], method, body)
        raise not_found(f"No admin route {method} {path}.")

    async def _batches(self, query: dict[str, str]) -> list[dict[str, Any]]:
        if self.batch_store is None:
            raise not_found("Batch jobs are off on this gateway (batch.enabled: false).")
        records = await asyncio.to_thread(self.batch_store.recent_batches, page_limit(query, 50, 200))
        return [{**record.as_openai(), "owner": record.owner} for record in records]

    async def _create_key(self, body: dict[str, Any]) -> dict[str, Any]:
        expires = body.get("expires_at")
        try:
            expires_at = dt.datetime.fromisoformat(expires) if isinstance(expires, str) else None
            models = body.get("models")
            plaintext, record = await asyncio.to_thread(
                self.store.create_key, str(body.get("name") or ""), models if isinstance(models, list) else None,
                body.get("rpm"), body.get("tpm"), body.get("budget_tokens"), body.get("tenant"),
                body.get("priority", "normal"), expires_at)
        except (ValueError, TypeError) as exc:
            raise bad_request(str(exc)) from None
        return {"key": plaintext, **record.as_dict()}

    async def _usage_series(self, query: dict[str, str]) -> list[dict[str, Any]]:
        bucket = query.get("bucket", "hour")
        try:
            num_buckets = int(query.get("buckets", "24" if bucket == "hour" else "30"))
            return await asyncio.to_thread(usage_series, self.store, bucket, num_buckets, query.get("key_id"))
        except ValueError as exc:
            raise bad_request(str(exc)) from None

    async def _revoke(self, key_id: str) -> tuple[int, Any]:
        if not await asyncio.to_thread(self.store.revoke, key_id):
            raise not_found(f"No live key {key_id!r}.")
        record = await asyncio.to_thread(self.store.get, key_id)
        self.auth.forget(record.id if record else key_id)
        return 200, {"id": key_id, "revoked": True}

    def _backends(self) -> dict[str, Any]:
        return {"models": {pool.name: {"strategy": pool.config.strategy,
                                       "in_flight": self.router.in_flight[pool.name],
                                       "backends": [b.describe() for b in pool.backends]}
                           for pool in self.router.pools.values()}}

    def _change_backend(self, action: list[str], method: str, body: dict[str, Any]) -> tuple[int, Any]:
        model, url = body.get("model"), body.get("url")
        if not isinstance(model, str) or not isinstance(url, str):
            raise bad_request("`model` and `url` are required strings.")
        try:
            if action == [] and method == "POST":
                config = BackendConfig(url, float(body.get("weight", 1.0)), body.get("api_key"))
                return 201, self.router.add_backend(model, config).describe()
            if action == ["drain"]:
                return 200, self.router.drain_backend(model, url).describe()
            if action == ["undrain"]:
                return 200, self.router.undrain_backend(model, url).describe()
            if action == ["remove"] or (action == [] and method == "DELETE"):
                return 200, {**self.router.remove_backend(model, url).describe(), "removed": True}
        except KeyError as exc:
            raise not_found(str(exc.args[0])) from None
        except (ValueError, TypeError) as exc:
            raise bad_request(str(exc)) from None
        raise not_found(f"No admin route {method} /admin/backends/{'/'.join(action)}.")
