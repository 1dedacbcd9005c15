"""Steps the engine in a child process of its own, so that it never waits for the server's GIL.

The server process keeps HTTP, tokenizing, detokenizing and streaming; the child loads the model
and runs `StepLoop`. They talk over two pipes with pickled messages: commands one way, batches of
events the other. In the child a reader thread feeds the step loop and a writer thread sends its
events, so neither pipe ever holds up a step. The server reads events as they arrive, whole
messages only (`PipeMessageReader`): only the end of the pipe (the child exited) or an unreadable
pipe counts as the engine's death, and the child's exit status (code or signal) is logged then.

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
import traceback
from multiprocessing.connection import Connection
from typing import Any

from lmserve.engine.async_engine import Command, EngineClient, EngineDeadError, Event, StepLoop
from lmserve.engine.config import EngineConfig
from lmserve.engine.engine import Engine, EngineInfo
from lmserve.heap import freeze_heap
from lmserve.server.logs import configure_logging
from lmserve.server.pipe_messages import PipeMessageReader

logger = logging.getLogger("lmserve.server")

_PIPE_BYTES = 2**20
"""Pipe buffer asked for, so a burst of requests does not block the event loop on a full pipe."""
_STOP_SECONDS = 30.0
_EXIT_SECONDS = 5.0
"""How long a child whose pipe ended may take to exit before it is killed."""


class ProcessEngine(EngineClient):
    """Event-loop side of an engine stepping in a child process."""

    def __init__(self, config: EngineConfig, log_level: str = "info") -> None:
        super().__init__(config)
        self.log_level = log_level
        self._process: subprocess.Popen | None = None
        self._commands: Connection | None = None
        self._events: Connection | None = None
        self._reader: PipeMessageReader | None = None
        self._is_stopping = False
        """`shutdown` asked the child to stop: the end of its pipe is expected, not a death."""
        self._exit_report: asyncio.Task | None = None
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
        self._reader = PipeMessageReader(self._events.fileno())
        self._loop.add_reader(self._events.fileno(), self._read_events)
        return self.info

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._loop is not None and self._events is not None

    def _send(self, command: Command) -> None:
        if self._commands is None:
            return  # stopped, or the child is gone: its requests were already failed
        try:
            self._commands.send(command)
        except OSError as exc:  # a broken pipe means the child is gone: its exit status says why
            self._lost(None if isinstance(exc, BrokenPipeError) else f"its command pipe failed ({exc})")

    def _read_events(self) -> None:
        reader = self._reader
        if reader is None:
            return
        try:
            batches = reader.read_messages()
        except Exception as exc:  # a pipe that cannot be read or unpickled serves nobody any more
            self._lost(f"its events could not be read ({type(exc).__name__}: {exc})")
            return
        for batch in batches:
            for event in batch:
                self._on_event(event)
        if reader.is_closed:
            self._lost()

    def _lost(self, reason: str | None = None) -> None:
        """The child closed its pipe (it exited) or a pipe broke: no request can be served any more
        (`is_alive` is False from now on); the requests fail once the child's exit status is known."""
        if self._events is None or self._loop is None:
            return  # already lost, or shut down
        self._close_pipes()
        if self._is_stopping:
            return
        self._exit_report = self._loop.create_task(self._report_exit(reason))

    async def _report_exit(self, reason: str | None) -> None:
        process = self._process
        if process is None:
            return
        try:
            code = await asyncio.to_thread(process.wait, _EXIT_SECONDS)
        except subprocess.TimeoutExpired:  # alive but unreachable: it can only hold memory now
            process.kill()
            code = await asyncio.to_thread(process.wait)
        cause = exit_cause(code) if reason is None else f"{reason}; it then {exit_cause(code)}"
        if self.error is None:
            self._died(EngineDeadError(f"the engine process {cause}"), f"the engine process {cause}")
        else:  # it reported its error before exiting; that was logged then
            logger.info("the engine process %s", cause, extra={"fields": {"pid": process.pid, "exit_code": code}})

    def _close_pipes(self) -> None:
        if self._events is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._events.fileno())
        for conn in (self._commands, self._events):
            if conn is not None:
                conn.close()
        self._commands = self._events = None

    async def shutdown(self) -> None:
        process = self._process
        self._is_stopping = True
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


def exit_cause(code: int) -> str:
    """How a child process ended, from its `returncode`: "exited with code 1", "was killed by SIGKILL"."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


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
    writer = threading.Thread(target=_write_events, args=(events, outbox, steps), name="events", daemon=True)
    writer.start()
    code = 0
    try:
        steps.run()
    except BaseException as exc:  # reported to the server, which logs it and fails every request with it
        logger.exception("the engine step loop failed")
        outbox.put(("died", _portable(exc), traceback.format_exc()))
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


def _write_events(events: Connection, outbox: queue.SimpleQueue, steps: StepLoop) -> None:
    """Sends what the step loop emitted, everything pending in one message. A batch that cannot
    be sent stops the engine: the server would otherwise wait forever for what it held."""
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
            except Exception as exc:
                logger.exception("the engine's events could not be sent")
                steps.stop()
                try:
                    events.send([("died", _portable(exc), traceback.format_exc())])
                except Exception:
                    pass  # the server still sees the pipe end when this process exits
                return
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
