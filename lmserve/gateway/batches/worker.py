"""The background worker that runs batches: claim, validate, run the requests not yet done, finalize.

Each gateway runs one worker. It claims active batches through leases in the database (store.py), so
gateways sharing a database share the work and a batch whose gateway died is resumed by another one
(or by the same one after a restart) once its lease lapses. At most `concurrency` requests run at
once over all batches, each through the gateway's own request path at the low priority class
(internal.py). A request refused for load or rate is retried until the batch's window ends; any
other answer is the request's result, recorded (once) the moment it arrives.

Invariant: a request is recorded at most once (store.record_result), and a batch leaves
in_progress only after every request has a result, or by cancel or expiry, whose unrun requests
then each get an error line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from lmserve.batch.jsonl import BatchInputError, BatchLine, error_line, is_success, parse_input, response_line
from lmserve.gateway.batches.records import BatchRecord
from lmserve.gateway.batches.store import BatchStore, new_id
from lmserve.gateway.config import BatchConfig

log = logging.getLogger("lmserve.gateway.batch")
Post = Callable[[dict[str, Any], str, bytes], Awaitable[tuple[int, dict[bytes, bytes], bytes]]]
_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_RETRY_AFTER = 60.0
_ENDED = {"cancelling": ("cancelled", "batch_cancelled", "The batch was cancelled before this request ran."),
          "in_progress": ("expired", "batch_expired",
                          "This request could not be executed before the completion window expired.")}


def _should_retry(status: int, body: bytes) -> bool:
    """Load and rate refusals pass with time; an exhausted budget does not."""
    return status in _RETRYABLE and b"insufficient_quota" not in body


def _retry_after(headers: dict[bytes, bytes], default: float) -> float:
    try:
        return min(_MAX_RETRY_AFTER, max(default, float(headers.get(b"retry-after", b""))))
    except ValueError:
        return default


class BatchWorker:
    """Invariant: `running` holds one task per batch this worker holds the lease of."""

    def __init__(self, store: BatchStore, config: BatchConfig, post: Post, urls: tuple[str, ...]) -> None:
        self.store = store
        self.config = config
        self.post = post
        self.urls = urls
        self.worker_id = new_id("worker-")
        self.running: dict[str, asyncio.Task[None]] = {}
        self._status: dict[str, str] = {}
        """Each running batch's status as last read."""
        self._lost: set[str] = set()
        """Running batches whose lease this worker lost (another worker may run them now)."""
        self._slots = asyncio.Semaphore(config.concurrency)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def wake(self) -> None:
        """Look for work now (a batch was created through this gateway)."""
        self._wake.set()

    def cancelled(self, batch_id: str) -> None:
        """A batch was cancelled through this gateway: when this worker runs it, it starts no more
        requests now (other gateways learn it at their next lease renewal)."""
        if batch_id in self._status:
            self._status[batch_id] = "cancelling"

    async def close(self) -> None:
        """Stops: requests in flight are abandoned unrecorded (they run again on resume) and the leases
        are released so that a restarted or another gateway resumes at once."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await self._task
        held = dict(self.running)
        for task in held.values():
            task.cancel()
        await asyncio.gather(*held.values(), return_exceptions=True)
        for batch_id in held:
            await asyncio.to_thread(self.store.release, self.worker_id, batch_id)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                claimed = await asyncio.to_thread(self.store.claim, self.worker_id, self.config.lease_seconds,
                                                  set(self.running))
            except Exception:
                log.exception("batch worker: claiming batches failed")
                claimed = []
            for batch in claimed:
                self._status[batch.id] = batch.status
                task = asyncio.get_running_loop().create_task(self._drive(batch))
                self.running[batch.id] = task
                task.add_done_callback(functools.partial(self._forget, batch.id))
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
            except asyncio.TimeoutError:
                pass

    def _forget(self, batch_id: str, _: asyncio.Task[None]) -> None:
        self.running.pop(batch_id, None)
        self._status.pop(batch_id, None)
        self._lost.discard(batch_id)

    async def _drive(self, batch: BatchRecord) -> None:
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(batch.id))
        try:
            lines = await self._lines(batch)
            if lines is not None:
                await self._run(batch, lines)
                await self._end(batch, lines)
        except Exception:
            log.exception("batch %s: worker failed; it resumes when its lease lapses", batch.id)
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, batch_id: str) -> None:
        while True:
            await asyncio.sleep(self.config.lease_seconds / 3)
            try:
                status = await asyncio.to_thread(self.store.renew, self.worker_id, batch_id,
                                                 self.config.lease_seconds)
                if status is None:
                    self._lost.add(batch_id)
                    return
                self._status[batch_id] = status
            except Exception:
                log.exception("batch %s: lease renewal failed", batch_id)

    async def _refresh(self, batch_id: str) -> BatchRecord | None:
        batch = await asyncio.to_thread(self.store.get_batch, batch_id)
        if batch is not None:
            self._status[batch_id] = batch.status
        return batch

    async def _lines(self, batch: BatchRecord) -> list[BatchLine] | None:
        """The input's requests; a validating batch moves to in_progress, or to failed when the file is bad."""
        content = await asyncio.to_thread(self.store.file_content, batch.owner, batch.input_file_id)
        errors: list[dict[str, Any]] = []
        lines: list[BatchLine] = []
        if content is None:
            errors = [{"code": "invalid_file", "message": f"The input file {batch.input_file_id} no longer exists.",
                       "param": "input_file_id", "line": None}]
        else:
            try:
                lines = parse_input(content, self.urls)
            except BatchInputError as exc:
                errors = [{"code": "invalid_request", "message": str(exc), "param": exc.param, "line": exc.line}]
            mismatch = next((line for line in lines if line.url != batch.endpoint), None)
            if mismatch is not None:
                errors = [{"code": "mismatched_endpoint", "param": "url", "line": mismatch.index + 1,
                           "message": f"request {mismatch.custom_id!r} is for {mismatch.url}, "
                                      f"the batch's endpoint is {batch.endpoint}"}]
        if batch.status == "validating":
            if errors:
                await asyncio.to_thread(self.store.set_status, batch.id, "failed", ("validating",), errors=errors,
                                        lease_owner=None, lease_until=None)
                return None
            await asyncio.to_thread(self.store.set_status, batch.id, "in_progress", ("validating",),
                                    total=len(lines))
        elif errors and batch.status != "finalizing":  # finalizing needs only the stored results
            log.error("batch %s: its input file became unreadable: %s", batch.id, errors[0]["message"])
            await asyncio.to_thread(self.store.set_status, batch.id, "failed", ("in_progress", "cancelling"),
                                    errors=errors, lease_owner=None, lease_until=None)
            return None
        return lines

    def _may_start(self, batch: BatchRecord) -> bool:
        return (self._status.get(batch.id) == "in_progress" and batch.id not in self._lost
                and not self._stop.is_set() and time.time() < batch.expires_at)

    async def _run(self, batch: BatchRecord, lines: list[BatchLine]) -> None:
        current = await self._refresh(batch.id)
        if current is None or current.status != "in_progress":
            return
        done = await asyncio.to_thread(self.store.done_indexes, batch.id)
        tasks: set[asyncio.Task[None]] = set()
        for line in lines:
            if line.index in done:
                continue
            await self._slots.acquire()
            if not self._may_start(batch):
                self._slots.release()
                break
            task = asyncio.get_running_loop().create_task(self._run_line(batch, line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _run_line(self, batch: BatchRecord, line: BatchLine) -> None:
        try:
            raw = orjson.dumps(line.body)
            while True:
                status, headers, body = await self.post(batch.principal, line.url, raw)
                if not _should_retry(status, body):
                    break
                delay = _retry_after(headers, self.config.retry_interval)
                if not self._may_start(batch) or time.time() + delay >= batch.expires_at:
                    return  # left for the end of the batch (cancelled or expired)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    return
                except asyncio.TimeoutError:
                    pass
            try:
                payload: Any = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = body.decode("utf-8", "replace")
            request_id = headers.get(b"x-request-id", b"").decode("latin-1")
            out = response_line(line.custom_id, status, request_id, payload)
            await asyncio.to_thread(self.store.record_result, batch.id, line.index, out, not is_success(status))
        finally:
            self._slots.release()

    async def _end(self, batch: BatchRecord, lines: list[BatchLine]) -> None:
        """Finalizes: completed when every request has a result, else cancelled or expired. Requests
        left while the batch is in progress gave up because the window ends before their next try:
        the batch expires when it does."""
        done = await asyncio.to_thread(self.store.done_indexes, batch.id)
        left = [line for line in lines if line.index not in done]
        current = await self._refresh(batch.id)
        if current is not None and current.status == "in_progress" and left and batch.id not in self._lost:
            try:
                await asyncio.wait_for(self._stop.wait(), max(0.0, batch.expires_at - time.time()))
            except asyncio.TimeoutError:
                pass
            current = await self._refresh(batch.id)
        if self._stop.is_set() or current is None or batch.id in self._lost:
            return  # stopping (the lease is released), gone, or another worker's now
        status = current.status
        if status == "in_progress" and not left:
            await asyncio.to_thread(self.store.set_status, batch.id, "finalizing", ("in_progress",))
            status = "finalizing"
        if status == "finalizing":
            await asyncio.to_thread(self.store.finalize, batch.id, batch.owner, "finalizing", "completed", [])
        elif status in _ENDED:
            final, code, message = _ENDED[status]
            extra = [error_line(line.custom_id, code, message) for line in left]
            await asyncio.to_thread(self.store.finalize, batch.id, batch.owner, status, final, extra, len(lines))
