"""Steps the engine in a child process of its own, so that it never waits for the server's GIL.

The server process keeps HTTP, tokenizing, detokenizing and streaming; the child loads the model
and runs `StepLoop`. They talk over two pipes with pickled messages: commands one way, batches of
events the other. In the child a reader thread feeds the step loop and a writer thread sends its
events, so neither pipe ever holds up a step.

The child ignores SIGINT and SIGTERM: the server drains on them and tells the child when to stop.
It also stops when the server goes away (the command pipe closes), so it never outlives it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from lmserve.engine.async_engine import Command, EngineClient, EngineDeadError, Event, StepLoop
from lmserve.engine.config import EngineConfig
from lmserve.engine.engine import Engine, EngineInfo
from lmserve.heap import freeze_heap
from lmserve.server.logs import configure_logging

logger = logging.getLogger("lmserve.server")

_PIPE_BYTES = 2**20
"""Pipe buffer asked for, so a burst of requests does not block the event loop on a full pipe."""
_STOP_SECONDS = 30.0


class ProcessEngine(EngineClient):
    """Event-loop side of an engine stepping in a child process."""

    def __init__(self, config: EngineConfig, log_level: str = "info") -> None:
        super().__init__(config)
        self.log_level = log_level
        self._process: subprocess.Popen | None = None
        self._commands: Connection | None = None
        self._events: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> EngineInfo:
        commands_read, commands_write = os.pipe()
        events_read, events_write = os.pipe()
        for fd in (commands_write, events_write):
            _grow_pipe(fd)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "lmserve.server.engine_process", str(commands_read), str(events_write)],
            pass_fds=(commands_read, events_write), stdin=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(events_write)
        self.pid = self._process.pid
        self._commands = Connection(commands_write, readable=False)
        self._events = Connection(events_read, writable=False)
        self._commands.send((self.config, self.log_level))
        try:
            first = await asyncio.to_thread(self._events.recv)
        except EOFError:
            code = await asyncio.to_thread(self._process.wait)
            raise RuntimeError(f"the engine process exited with code {code} while loading") from None
        if first[0] == "failed":
            await asyncio.to_thread(self._process.wait)
            raise first[1]
        _, self.info, self.latest_stats = first
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._events.fileno(), self._read_events)
        return self.info

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._loop is not None

    def _send(self, command: Command) -> None:
        if self._commands is None:
            return  # stopped, or the child is gone: its requests were already failed
        try:
            self._commands.send(command)
        except OSError as exc:
            self._lost(exc)

    def _read_events(self) -> None:
        events = self._events
        if events is None:
            return
        try:
            while events.poll():
                for event in events.recv():
                    self._on_event(event)
        except (EOFError, OSError) as exc:
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        """The child exited or its pipe broke: every request fails, and /health turns 503."""
        self._close_pipes()
        code = self._process.poll() if self._process is not None else None
        if self.error is None:
            logger.error("the engine process exited (code %s)", code)
        self._died(EngineDeadError(f"the engine process exited (code {code}): {type(exc).__name__}"))

    def _close_pipes(self) -> None:
        if self._events is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._events.fileno())
        for conn in (self._commands, self._events):
            if conn is not None:
                conn.close()
        self._commands = self._events = None

    async def shutdown(self) -> None:
        process = self._process
        if self._commands is not None:
            try:
                self._commands.send(("shutdown",))
            except OSError:
                pass
        if process is not None:
            try:
                await asyncio.to_thread(process.wait, _STOP_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("the engine process did not stop in %.0f s: killing it", _STOP_SECONDS)
                process.kill()
                await asyncio.to_thread(process.wait)
        self._close_pipes()
        self._fail_all(RuntimeError("the server is shutting down"))


def _grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size still works


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------- child side


def _child(commands: Connection, events: Connection) -> int:
    config, log_level = commands.recv()
    configure_logging(log_level)
    try:
        engine = Engine(config)
    except Exception as exc:
        events.send(("failed", _portable(exc)))
        return 1
    freeze_heap("engine")
    events.send(("ready", engine.info, engine.stats()))
    outbox: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
    steps = StepLoop(engine, outbox.put)
    threading.Thread(target=_read_commands, args=(commands, steps), name="commands", daemon=True).start()
    writer = threading.Thread(target=_write_events, args=(events, outbox), name="events", daemon=True)
    writer.start()
    code = 0
    try:
        steps.run()
    except BaseException as exc:  # reported to the server, which fails every request with it
        logger.exception("the engine step loop failed")
        outbox.put(("died", _portable(exc)))
        code = 1
    outbox.put(None)
    writer.join(_STOP_SECONDS)
    return code


def _read_commands(commands: Connection, steps: StepLoop) -> None:
    while True:
        try:
            command: Command = commands.recv()
        except (EOFError, OSError):
            command = ("shutdown",)  # the server is gone
        if command[0] == "shutdown":
            steps.stop()
            return
        steps.submit(command)


def _write_events(events: Connection, outbox: queue.SimpleQueue) -> None:
    """Sends what the step loop emitted, everything pending in one message."""
    while True:
        batch: list[Any] = [outbox.get()]
        while True:
            try:
                batch.append(outbox.get_nowait())
            except queue.Empty:
                break
        done = batch[-1] is None
        batch = [event for event in batch if event is not None]
        if batch:
            try:
                events.send(batch)
            except OSError:
                return  # the server is gone
        if done:
            return


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    commands = Connection(int(argv[0]), writable=False)
    events = Connection(int(argv[1]), readable=False)
    return _child(commands, events)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
