"""OpenAI's Files and Batch APIs, for the `openai` SDK's `client.files` and `client.batches`.

  POST   /v1/files                    multipart {file, purpose: "batch"}: validated JSONL (400 names the line)
  GET    /v1/files[?purpose&after&limit]
  GET    /v1/files/{id}               the file object
  GET    /v1/files/{id}/content       the bytes (input, output or error file)
  DELETE /v1/files/{id}
  POST   /v1/batches                  {input_file_id, endpoint, completion_window, metadata?}
  GET    /v1/batches[?after&limit]    newest first
  GET    /v1/batches/{id}
  POST   /v1/batches/{id}/cancel

Files and batches belong to the caller's tenant, or to its key when the key has no tenant
(internal.owner_of): anyone else gets a 404, as for an id that does not exist.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import parse_qs

from lmserve.batch.jsonl import BatchInputError, parse_input
from lmserve.gateway.asgi import Receive, Send, header_map, read_body, send_bytes, send_error, send_json
from lmserve.gateway.auth import Authenticator, Principal
from lmserve.gateway.batches.internal import owner_of, principal_snapshot
from lmserve.gateway.batches.multipart import parse_form
from lmserve.gateway.batches.store import BatchStore
from lmserve.gateway.batches.worker import BatchWorker
from lmserve.gateway.config import BatchConfig
from lmserve.gateway.errors import GatewayError, bad_request, not_found
from lmserve.gateway.validation import body_too_large, parse_json

PREFIXES = ("/v1/files", "/v1/batches")
_WINDOW = re.compile(r"(\d+)([smh])")
_MAX_WINDOW_SECONDS = 24 * 3600
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
_MAX_JSON_BYTES = 1 << 20


def window_seconds(value: Any) -> int:
    """`24h` (OpenAI's one window), or a shorter one such as `30m` or `90s`; 400 otherwise."""
    match = _WINDOW.fullmatch(value) if isinstance(value, str) else None
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    if not 0 < seconds <= _MAX_WINDOW_SECONDS:
        raise bad_request(f"completion_window must be \"24h\" (or a shorter duration such as \"30m\"), got {value!r}.",
                          "completion_window")
    return seconds


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                       for k, v in value.items())):
        raise bad_request("metadata must be at most 16 string pairs (keys up to 64, values up to 512 characters).",
                          "metadata")
    return value


def _page(items: list[Any], limit: int) -> dict[str, Any]:
    shown = items[:limit]
    return {"object": "list", "data": [i.as_openai() for i in shown], "has_more": len(items) > limit,
            "first_id": shown[0].id if shown else None, "last_id": shown[-1].id if shown else None}


def page_limit(query: dict[str, str], default: int = 20, maximum: int = 10_000) -> int:
    """The `limit` query parameter, 1..maximum; a 400 naming it otherwise."""
    try:
        limit = int(query.get("limit", str(default)))
    except ValueError:
        raise bad_request("limit must be an integer.", "limit") from None
    if not 1 <= limit <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}.", "limit")
    return limit


class BatchAPI:
    def __init__(self, config: BatchConfig, store: BatchStore, auth: Authenticator, worker: BatchWorker,
                 urls: tuple[str, ...]) -> None:
        self.config = config
        self.store = store
        self.auth = auth
        self.worker = worker
        self.urls = urls

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        try:
            principal = await self.auth.authenticate(headers.get(b"authorization"))
            query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            parts = scope["path"].strip("/").split("/")[1:]  # ["files", id?, "content"?] or ["batches", ...]
            method = scope["method"]
            if method == "POST":
                limit = self.config.max_file_bytes if parts == ["files"] else _MAX_JSON_BYTES
                raw = await read_body(receive, limit, headers.get(b"content-length"), body_too_large)
                if parts == ["files"]:
                    await send_json(send, 200, await self._upload(principal, raw, headers.get(b"content-type")))
                    return
                await send_json(send, 200, await self._post_batch(principal, parts, raw))
            elif method == "GET" and parts[-1:] == ["content"] and len(parts) == 3 and parts[0] == "files":
                content = await asyncio.to_thread(self.store.file_content, owner_of(principal), parts[1])
                if content is None:
                    raise self._missing("file", parts[1])
                await send_bytes(send, 200, content, content_type=b"application/octet-stream")
            else:
                await send_json(send, 200, await self._other(method, principal, parts, query))
        except GatewayError as error:
            await send_error(send, error)

    @staticmethod
    def _missing(kind: str, item_id: str) -> GatewayError:
        return not_found(f"No {kind} with id {item_id!r}.", "not_found", "id")

    async def _upload(self, principal: Principal, raw: bytes, content_type: bytes | None) -> dict[str, Any]:
        form = parse_form(raw, content_type)
        purpose = form["purpose"].content.decode("utf-8", "replace") if "purpose" in form else None
        if purpose != "batch":
            raise bad_request(f"purpose must be \"batch\" (the only purpose this gateway serves), got {purpose!r}.",
                              "purpose")
        upload = form.get("file")
        if upload is None:
            raise bad_request("The form has no `file` field.", "file")
        try:
            await asyncio.to_thread(parse_input, upload.content, self.urls, self.config.max_requests)
        except BatchInputError as exc:
            raise bad_request(f"Invalid batch input file: {exc}.", exc.param or "file",
                              "invalid_batch_input") from None
        record = await asyncio.to_thread(self.store.create_file, owner_of(principal), "batch",
                                         upload.filename or "upload.jsonl", upload.content)
        return record.as_openai()

    async def _post_batch(self, principal: Principal, parts: list[str], raw: bytes) -> dict[str, Any]:
        owner = owner_of(principal)
        if parts == ["batches"]:
            return await self._create_batch(principal, parse_json(raw) if raw else {})
        if len(parts) == 3 and parts[0] == "batches" and parts[2] == "cancel":
            batch = await asyncio.to_thread(self.store.request_cancel, owner, parts[1])
            if batch is None:
                raise self._missing("batch", parts[1])
            if batch.status not in ("cancelling", "cancelled"):
                raise GatewayError(409, f"A batch that is {batch.status} cannot be cancelled.",
                                   "invalid_request_error", "batch_not_cancellable")
            self.worker.cancelled(batch.id)
            return batch.as_openai()
        raise not_found(f"No route POST /v1/{'/'.join(parts)}.")

    async def _create_batch(self, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = body.get("endpoint")
        if endpoint not in self.urls:
            raise bad_request(f"endpoint must be one of {list(self.urls)}, got {endpoint!r}.", "endpoint")
        seconds = window_seconds(body.get("completion_window"))
        metadata = _metadata(body.get("metadata"))
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise bad_request("input_file_id must be the id of an uploaded file.", "input_file_id")
        owner = owner_of(principal)
        record = await asyncio.to_thread(self.store.get_file, owner, file_id)
        if record is None or record.purpose != "batch":
            raise not_found(f"No file with id {file_id!r} and purpose \"batch\".", "not_found", "input_file_id")
        batch = await asyncio.to_thread(self.store.create_batch, owner, principal_snapshot(principal), endpoint,
                                        file_id, body["completion_window"], seconds, metadata)
        self.worker.wake()
        return batch.as_openai()

    async def _other(self, method: str, principal: Principal, parts: list[str],
                     query: dict[str, str]) -> dict[str, Any]:
        owner = owner_of(principal)
        kind, item_id = parts[0], parts[1] if len(parts) == 2 else None
        if method == "GET" and len(parts) == 1:
            limit = page_limit(query)
            if kind == "files":
                files = await asyncio.to_thread(self.store.list_files, owner, query.get("purpose"),
                                                query.get("after"), limit + 1)
                return _page(files, limit)
            batches = await asyncio.to_thread(self.store.list_batches, owner, query.get("after"), limit + 1)
            return _page(batches, limit)
        if item_id is None or len(parts) != 2:
            raise not_found(f"No route {method} /v1/{'/'.join(parts)}.")
        if method == "GET" and kind == "files":
            file = await asyncio.to_thread(self.store.get_file, owner, item_id)
            if file is None:
                raise self._missing("file", item_id)
            return file.as_openai()
        if method == "GET":
            batch = await asyncio.to_thread(self.store.get_batch, item_id, owner)
            if batch is None:
                raise self._missing("batch", item_id)
            return batch.as_openai()
        if method == "DELETE" and kind == "files":
            if not await asyncio.to_thread(self.store.delete_file, owner, item_id):
                raise self._missing("file", item_id)
            return {"id": item_id, "object": "file", "deleted": True}
        raise GatewayError(405, f"{method} /v1/{'/'.join(parts)} is not supported.", "invalid_request_error",
                           "method_not_allowed")
