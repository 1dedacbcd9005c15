"""Drives a synchronous `Engine` for an asyncio application, from a thread or from a process.

The event loop never touches the engine. It sends commands (add, abort, stop) to a `StepLoop`,
which applies them between steps and reports events back: a request added or refused, and each
step's outputs with the engine's stats. `EngineClient` is the event-loop side: it turns the
events into one async iterator per request. `ThreadEngine` runs the step loop on a thread of this
process; `ProcessEngine` (lmserve.engine.engine_process) in a child process of its own.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmserve.engine.config import EngineConfig
from lmserve.engine.engine import Engine, EngineInfo, EngineStats
from lmserve.engine.outputs import SequenceOutput
from lmserve.engine.sampling_params import SamplingParams

Command = tuple[Any, ...]
"""("add", request_id, prompt_token_ids, params, options) | ("abort", request_id) |
("stop", request_id, index)."""
Event = tuple[Any, ...]
"""("added", request_id, error or None) | ("step", outputs, stats, seconds) | ("stats", stats) |
("died", error, traceback text): the step loop stopped on an error."""
StepHook = Callable[[EngineStats, float], None]

logger = logging.getLogger("lmserve.engine")


class EngineDeadError(RuntimeError):
    """The step loop stopped because of an error; no request can be served any more."""


class StepLoop:
    """Steps an engine while it has work, applying the commands submitted between steps.

    `submit` and `stop` may be called from any thread; `run` owns the engine.
    """

    def __init__(self, engine: Engine, emit: Callable[[Event], None]) -> None:
        self.engine = engine
        self._emit = emit
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False

    def submit(self, command: Command) -> None:
        self._inbox.put(command)
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def run(self) -> None:
        """Returns after `stop()`; raises what the engine raises."""
        engine = self.engine
        while not self._stopping:
            if self._apply_commands():
                self._emit(("stats", engine.stats()))
            if not engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            started = time.perf_counter()
            outputs = engine.step()
            self._emit(("step", outputs, engine.stats(), time.perf_counter() - started))

    def _apply_commands(self) -> bool:
        """Applies every queued command; True if there was any."""
        applied = False
        engine = self.engine
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            kind = command[0]
            if kind == "add":
                _, request_id, prompt, params, options = command
                try:
                    engine.add_request(request_id, prompt, params, **options)
                except Exception as exc:  # handed back to the caller, who maps it to a response
                    self._emit(("added", request_id, exc))
                else:
                    self._emit(("added", request_id, None))
            elif kind == "abort":
                engine.abort_request(command[1])
            elif kind == "stop":
                engine.stop_sequence(command[1], command[2])


@dataclass
class _Request:
    outputs: asyncio.Queue
    num_seqs: int
    finished: set[int] = field(default_factory=set)
    """Indices of the sequences that ended (reported by the engine, or stopped by the caller)."""

    @property
    def is_done(self) -> bool:
        return len(self.finished) == self.num_seqs


class EngineClient:
    """The event-loop side of an engine that steps elsewhere.

    Invariant: `_requests` holds exactly the requests whose iterators are live; `_adding` the
    requests sent to the engine whose admission is not known yet.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.on_step: StepHook | None = None
        """Called on the event loop after every step with the stats and the step's seconds."""
        self.on_death: Callable[[BaseException], None] | None = None
        """Called on the event loop once, after the engine died and its requests were failed."""
        self.info: EngineInfo | None = None
        self.latest_stats: EngineStats | None = None
        self.error: BaseException | None = None
        self.pid: int | None = None
        """The engine's process when it is not this one."""
        self._requests: dict[str, _Request] = {}
        self._adding: dict[str, asyncio.Future] = {}

    async def start(self) -> EngineInfo:
        """Loads the model and starts stepping; raises what loading raises."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Stops stepping; requests still running end with `EngineDeadError`."""
        raise NotImplementedError

    @property
    def is_alive(self) -> bool:
        raise NotImplementedError

    def _send(self, command: Command) -> None:
        raise NotImplementedError

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
        if self.info is None:
            raise RuntimeError("the engine was not started")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = self.info.limits.validate(prompt_token_ids)
        added = asyncio.get_running_loop().create_future()
        self._adding[request_id] = added
        self._requests[request_id] = _Request(asyncio.Queue(), params.n)
        self._send(("add", request_id, prompt, params, options))
        try:
            await added
        except BaseException:
            self._requests.pop(request_id, None)
            if not added.done():
                self.abort(request_id)
            raise
        finally:
            self._adding.pop(request_id, None)
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

    def _on_event(self, event: Event) -> None:
        kind = event[0]
        if kind == "step":
            _, outputs, stats, seconds = event
            self.latest_stats = stats
            requests = self._requests
            for out in outputs:
                request = requests.get(out.request_id)
                if request is not None:
                    request.outputs.put_nowait(out)
            if self.on_step is not None:
                self.on_step(stats, seconds)
        elif kind == "stats":
            self.latest_stats = event[1]
        elif kind == "added":
            _, request_id, error = event
            future = self._adding.get(request_id)
            if future is None or future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        elif kind == "died":
            self._died(event[1], event[2])

    def _fail_all(self, error: BaseException) -> None:
        dead = EngineDeadError(f"the engine stopped: {error}")
        for request in self._requests.values():
            request.outputs.put_nowait(dead)
        for future in self._adding.values():
            if not future.done():
                future.set_exception(dead)

    def _died(self, error: BaseException, cause: str) -> None:
        """Logs why the engine died (`cause`: a traceback, or how its process ended), fails every
        request, then tells `on_death`. Only the first death counts."""
        if self.error is not None:
            return
        self.error = error
        logger.error("the engine died", extra={"fields": {"cause": cause}})
        self._fail_all(error)
        if self.on_death is not None:
            self.on_death(error)


class ThreadEngine(EngineClient):
    """Steps the engine on a thread of this process. PyTorch releases the GIL inside its kernels,
    so the step loop and the HTTP handlers run side by side, but every Python line of either
    waits for the GIL."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._steps: StepLoop | None = None
        self._thread: threading.Thread | None = None
        self._is_stepping = True

    async def start(self) -> EngineInfo:
        loop = asyncio.get_running_loop()
        engine = await asyncio.to_thread(Engine, self.config)
        self.info, self.latest_stats = engine.info, engine.stats()
        self._steps = StepLoop(engine, lambda event: loop.call_soon_threadsafe(self._on_event, event))
        self._thread = threading.Thread(target=self._run, args=(loop, self._steps), name="lmserve-engine",
                                        daemon=True)
        self._thread.start()
        return self.info

    @property
    def is_alive(self) -> bool:
        return (self.error is None and self._is_stepping and self._thread is not None
                and self._thread.is_alive())

    def _send(self, command: Command) -> None:
        if self._steps is None:
            raise RuntimeError("the engine was not started")
        self._steps.submit(command)

    def _run(self, loop: asyncio.AbstractEventLoop, steps: StepLoop) -> None:
        try:
            steps.run()
        except BaseException as exc:  # the loop must report any death, not vanish silently
            self._is_stepping = False  # at once, for is_alive; the event fails the requests on the loop
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._on_event, ("died", exc, traceback.format_exc()))

    async def shutdown(self) -> None:
        if self._steps is not None:
            self._steps.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._fail_all(RuntimeError("the server is shutting down"))
