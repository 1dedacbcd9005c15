"""Drives a synchronous `Engine` from its own thread for an asyncio application.

The event loop never touches the engine: it puts commands (add, abort, stop) into an inbox and
receives each step's outputs through `call_soon_threadsafe`. PyTorch releases the GIL inside its
kernels, so the step loop and the HTTP handlers run side by side.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmserve.engine.engine import Engine, EngineStats
from lmserve.engine.outputs import SequenceOutput
from lmserve.engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The step loop stopped because of an error; no request can be served any more."""


@dataclass
class _Request:
    outputs: asyncio.Queue
    num_seqs: int
    finished: set[int] = field(default_factory=set)
    """Indices of the sequences that ended (reported by the engine, or stopped by the caller)."""

    @property
    def is_done(self) -> bool:
        return len(self.finished) == self.num_seqs


StepHook = Callable[[EngineStats, float], None]


class AsyncEngine:
    """Invariant: `_requests` (event-loop side) holds exactly the requests whose iterators are live;
    the engine thread alone calls into `engine`."""

    def __init__(self, engine: Engine, on_step: StepHook | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        """Called on the engine thread after every step with the stats and the step's seconds."""
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, _Request] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.latest_stats: EngineStats = engine.stats()

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        """Starts the step thread; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, **options: Any
    ) -> AsyncIterator[SequenceOutput]:
        """Submits a request and returns an iterator over its sequences' outputs.

        Raises at once what `Engine.add_request` raises (ValueError, overload). Leaving the
        iterator early (client gone) aborts the request in the engine.
        """
        if self.error is not None:
            raise EngineDeadError("the engine stopped after an error") from self.error
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.engine.validate_prompt(prompt_token_ids)  # reads only constants: safe from this thread
        added = self._event_loop().create_future()
        self._requests[request_id] = _Request(asyncio.Queue(), params.n)
        self._send(("add", request_id, list(prompt_token_ids), params, options, added))
        try:
            await added
        except BaseException:
            self._requests.pop(request_id, None)
            if not added.done():
                self.abort(request_id)
            raise
        return self._iterate(request_id)

    async def _iterate(self, request_id: str) -> AsyncIterator[SequenceOutput]:
        request = self._requests[request_id]
        try:
            while not request.is_done:
                item = await request.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                if item.index in request.finished:
                    continue  # stopped by the caller; the engine's step had already run
                if item.finished:
                    request.finished.add(item.index)
                yield item
        finally:
            self._requests.pop(request_id, None)
            if not request.is_done:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stop_sequence(self, request_id: str, index: int) -> None:
        """Ends one sequence with reason `stop` (its text matched a stop string); no further
        outputs of it are delivered."""
        request = self._requests.get(request_id)
        if request is not None:
            request.finished.add(index)
        self._send(("stop", request_id, index))

    async def shutdown(self) -> None:
        """Stops the step thread; requests still running end with `EngineDeadError`."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _send(self, command: tuple[Any, ...]) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _deliver(self, outputs: list[SequenceOutput]) -> None:
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is not None:
                request.outputs.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        dead = EngineDeadError(f"the engine stopped: {error}")
        for request in self._requests.values():
            request.outputs.put_nowait(dead)

    # ------------------------------------------------------------------ engine-thread side

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("AsyncEngine.start() was not called")
        return self._loop

    def _run(self) -> None:
        loop = self._event_loop()
        try:
            while not self._stopping:
                if self._apply_commands():
                    self.latest_stats = self.engine.stats()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                started = time.perf_counter()
                outputs = self.engine.step()
                self.latest_stats = self.engine.stats()
                if self.on_step is not None:
                    self.on_step(self.latest_stats, time.perf_counter() - started)
                if outputs:
                    loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as exc:  # the loop must report any death, not vanish silently
            self.error = exc
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._fail_all, exc)

    def _apply_commands(self) -> bool:
        """Applies every queued command; True if there was any."""
        applied = False
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            kind = command[0]
            if kind == "add":
                _, request_id, prompt, params, options, added = command
                try:
                    self.engine.add_request(request_id, prompt, params, **options)
                    self._resolve(added, None)
                except Exception as exc:  # handed back to the caller, who maps it to a response
                    self._resolve(added, exc)
            elif kind == "abort":
                self.engine.abort_request(command[1])
            elif kind == "stop":
                self.engine.stop_sequence(command[1], command[2])

    def _resolve(self, future: asyncio.Future, error: Exception | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        self._event_loop().call_soon_threadsafe(settle)
