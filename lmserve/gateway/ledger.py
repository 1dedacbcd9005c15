"""Usage ledger: per key and model, accumulated in memory and written in batches off the hot path.

`add` is a dict update; a background task hands the accumulated rows to the key store every
`interval` seconds in one transaction (in a worker thread). Invariant: every increment passed to
`add` is written exactly once, by a flush, or by `close()` at shutdown; a failed write is kept and
retried on the next flush.
"""

from __future__ import annotations

import asyncio
import logging

from lmserve.gateway.keystore import KeyStore, UsageRow

log = logging.getLogger("lmserve.gateway")


class UsageLedger:
    def __init__(self, store: KeyStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def add(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int,
            cached_tokens: int) -> None:
        row = self._pending.get((key_id, model))
        if row is None:
            self._pending[(key_id, model)] = [1, prompt_tokens, completion_tokens, cached_tokens]
        else:
            row[0] += 1
            row[1] += prompt_tokens
            row[2] += completion_tokens
            row[3] += cached_tokens

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # Stopped through an event, never cancelled: a batch being written is never lost mid-way.
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        rows = [UsageRow(k, m, *v) for (k, m), v in batch.items()]
        try:
            await asyncio.to_thread(self.store.record_usage, rows)
        except Exception:
            log.exception("usage ledger write failed; keeping %d rows for the next flush", len(rows))
            for (key_id, model), values in batch.items():
                row = self._pending.setdefault((key_id, model), [0, 0, 0, 0])
                for i, v in enumerate(values):
                    row[i] += v

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.flush()
