"""The Files and Batch APIs and their worker, made together at gateway start-up and closed at shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa

from lmserve.gateway.asgi import Receive, Send
from lmserve.gateway.auth import Authenticator
from lmserve.gateway.batches.api import PREFIXES, BatchAPI
from lmserve.gateway.batches.internal import InternalClient
from lmserve.gateway.batches.store import BatchStore
from lmserve.gateway.batches.worker import BatchWorker
from lmserve.gateway.config import GatewayConfig
from lmserve.gateway.handler import ProxyHandler
from lmserve.gateway.routes import FORWARDED


def is_batch_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PREFIXES)


class BatchService:
    """Invariant: the worker runs from `start` until `close`; the API serves only meanwhile."""

    def __init__(self, api: BatchAPI, worker: BatchWorker) -> None:
        self.api = api
        self.worker = worker

    @classmethod
    async def start(cls, config: GatewayConfig, engine: sa.Engine, handler: ProxyHandler,
                    auth: Authenticator) -> BatchService:
        # A batch may call every route the gateway forwards (the chat and text completions today).
        urls = tuple(FORWARDED)
        store = await asyncio.to_thread(BatchStore, engine)
        client = InternalClient(handler, auth, config.key_cache_ttl)
        worker = BatchWorker(store, config.batch, client.post, urls)
        worker.start()
        return cls(BatchAPI(config.batch, store, auth, worker, urls), worker)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await self.api(scope, receive, send)

    async def close(self) -> None:
        await self.worker.close()
