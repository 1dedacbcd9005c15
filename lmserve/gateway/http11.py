"""The gateway's HTTP/1.1 server protocol: ASGI over `httptools`, plugged into uvicorn as its `http` class.

Why not uvicorn's own httptools protocol: on the gateway's hot path (a small request in, a small
response out) it writes the response head and the body in two socket writes and checks every header
with two regular expressions. A second `send` syscall per request on loopback costs as much as the
gateway's whole admission step (benchmarks/gateway_overhead.py). This protocol holds the head until
the first body message and writes both at once; the client cannot tell the difference, since no
byte of a response is useful before its first body byte. uvicorn still owns the sockets, TLS,
lifespan, signals and graceful shutdown (`shutdown()` below is its hook).

Hostile input: control bytes are refused anywhere in the request target, raw (llhttp rejects them)
or percent-encoded (`%00`-`%1F`, `%7F`: a decoded CR LF in a path could otherwise end up in a
header or request line further on), and in header names and values (llhttp again; HTAB is the one
control byte HTTP allows in a value). A client that takes longer than `body_timeout` to send its
body after its head gets a 408 and the connection closes. Every refusal is an OpenAI error body.

What it does: keep-alive with an idle timeout; pipelined requests answered in order (at most
`_MAX_PIPELINE` queued before reading pauses); request bodies streamed to `receive()` with read
back-pressure; `Expect: 100-continue`; chunked responses when the app gives no content-length
(close-delimited for HTTP/1.0 clients); HEAD; write back-pressure; `http.disconnect` when the client
leaves or after the response; 400 on a malformed request, 431 on oversized headers, 408 on a body too
slow, 500 when the app fails before its response starts. No upgrades (WebSocket; an `Upgrade` request is answered as plain
HTTP, then the connection closes), no HTTP/2.

Invariant: `active` is the request whose app task runs (at most one per connection); `pending` holds
parsed requests waiting their turn; `incoming` is the request the parser is filling.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from lmserve.gateway.http11_cycle import Cycle, error_response
from lmserve.gateway.waiter import Waiter

log = logging.getLogger("lmserve.gateway")

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_READ_HIGH_WATER = 64 * 1024
_MAX_PIPELINE = 16
_MAX_HEAD_BYTES = 64 * 1024
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ENCODED_CONTROL = re.compile(rb"%(?:[01][0-9A-Fa-f]|7[Ff])")
"""A percent-encoded C0 control byte or DEL (raw ones never get past llhttp)."""


class _Refusal(Exception):
    """Raised from a parser callback to stop parsing and refuse the request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HTTP11Protocol(asyncio.Protocol):
    """One client connection. Constructed by uvicorn (`uvicorn.Config(app, http=HTTP11Protocol)`)."""

    body_timeout: float | None = None
    """Seconds a client may take from the end of a request head to the end of its body (None: no
    limit). Set on a subclass made by `with_body_timeout`, since uvicorn constructs the protocol."""

    @classmethod
    def with_body_timeout(cls, seconds: float) -> type[HTTP11Protocol]:
        """This protocol with a body read timeout, for `uvicorn.Config(http=...)`."""
        if seconds <= 0:
            raise ValueError(f"the body read timeout must be > 0 seconds, got {seconds}")
        return type("HTTP11ProtocolWithBodyTimeout", (cls,), {"body_timeout": float(seconds)})

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.root_path = config.root_path
        self.keep_alive_timeout = config.timeout_keep_alive
        self.server_state = server_state
        self.app_state = app_state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.active: Cycle | None = None
        self.incoming: Cycle | None = None
        self.pending: deque[Cycle] = deque()
        self.is_read_paused = False
        self.is_write_paused = False
        self.is_closing = False
        self.is_refused = False
        """A request could not be parsed: nothing more is read from this connection."""
        self.drained = Waiter(self.loop)
        """Woken when the transport's write buffer has room again."""
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        self.body_timer: asyncio.TimerHandle | None = None
        """Armed while a request body is arriving over more than one read (never for a whole request in one)."""
        self.names: dict[bytes, bytes] = {}
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_chunk_bytes = 0
        self._in_head = False
        self._message_began = False
        self._expects_continue = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)
        self.server = get_local_addr(self.transport)
        self.client = get_remote_addr(self.transport)
        self.scheme = "https" if is_ssl(self.transport) else "http"
        self.idle_since = self.loop.time()
        self._arm_idle_timer(self.keep_alive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self.is_closing = True
        self._cancel_idle_timer()
        self._cancel_body_timer()
        for cycle in (self.active, *self.pending, self.incoming):
            if cycle is not None and not cycle.is_response_complete:
                cycle.is_disconnected = True
                cycle.waiter.wake()
        self.pending.clear()
        self.resume_writing()

    def eof_received(self) -> bool | None:
        return None  # close our side too: a half-closed client gets no more responses

    def data_received(self, data: bytes) -> None:
        was_in_head = self._in_head
        self._message_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrades are not supported: the request itself is answered as plain HTTP (the app has it
            # already), then the connection closes.
            self._refuse(400, "Protocol upgrades are not supported.")
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Refusal):  # raised by one of our callbacks
                self._refuse(exc.__context__.status, exc.__context__.message)
            else:
                self._refuse(431 if self._head_bytes > _MAX_HEAD_BYTES else 400, "Malformed HTTP request.")
        else:
            if self.incoming is not None and self.body_timer is None and self.body_timeout is not None:
                self.body_timer = self.loop.call_later(self.body_timeout, self._on_body_timeout)
            if was_in_head and self._in_head and not self._message_began:
                # This chunk lies wholly inside one request head: a header line that never ends is
                # refused here, before httptools has passed any of it on.
                self._head_chunk_bytes += len(data)
                if self._head_chunk_bytes > _MAX_HEAD_BYTES:
                    self._refuse(431, "Request head too large.")

    def pause_writing(self) -> None:
        self.is_write_paused = True

    def resume_writing(self) -> None:
        self.is_write_paused = False
        self.drained.wake()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._head_chunk_bytes = 0
        self._in_head = True
        self._message_began = True
        self._expects_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        self._headers.append((lower, value))
        if lower == b"expect" and value.lower() == b"100-continue":
            self._expects_continue = True
        self._grow_head(len(name) + len(value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        url = self._url
        if b"%" in url and _ENCODED_CONTROL.search(url):
            raise _Refusal(400, "The request target contains an encoded control character.")
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:  # absolute form: http://host/path?query
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("ascii", "replace")
        if "%" in path:
            path = unquote(path)
        method = parser.get_method().decode("ascii")
        scope = {"type": "http", "asgi": _ASGI, "http_version": parser.get_http_version(), "server": self.server,
                 "client": self.client, "scheme": self.scheme, "method": method, "root_path": self.root_path,
                 "path": path, "raw_path": raw_path, "query_string": query, "headers": self._headers,
                 "state": self.app_state.copy()}
        cycle = Cycle(self, scope, parser.should_keep_alive() and not self.is_closing, self._expects_continue)
        self.incoming = cycle
        self.server_state.total_requests += 1
        if self.active is None:
            self._start(cycle)
        else:
            self.pending.append(cycle)
            if len(self.pending) >= _MAX_PIPELINE:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.incoming
        if cycle is None or cycle.is_disconnected or cycle.is_response_complete:
            return  # nobody will read it
        cycle.body_parts.append(body)
        cycle.body_size += len(body)
        if cycle.body_size > _READ_HIGH_WATER:
            self._pause_reading()
        cycle.waiter.wake()

    def on_message_complete(self) -> None:
        cycle = self.incoming
        if cycle is None:
            return
        self.incoming = None
        if self.body_timer is not None:
            self._cancel_body_timer()
        cycle.is_body_complete = True
        cycle.waiter.wake()

    # request flow
    def _start(self, cycle: Cycle) -> None:
        self.active = cycle
        task = self.loop.create_task(cycle.run(self.app))
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_response_complete(self, cycle: Cycle) -> None:
        cycle.waiter.wake()  # a receive() waiting for the disconnect returns now
        self.active = None  # only the active request's task runs, so `cycle` is the active one
        if not cycle.keep_alive or self.is_closing or not cycle.is_body_complete:
            # Answered before its body was read (a 413, say): close rather than read the rest.
            self.transport.close()
            return
        if self.pending:
            self._start(self.pending.popleft())
            if len(self.pending) < _MAX_PIPELINE // 2:
                self.resume_body()
        else:
            self.idle_since = self.loop.time()

    def resume_body(self) -> None:
        """Reading resumes once the app has taken the buffered body and the pipeline has room."""
        if self.is_read_paused and len(self.pending) < _MAX_PIPELINE and not self.is_refused:
            incoming = self.incoming
            if incoming is None or incoming.body_size <= _READ_HIGH_WATER:
                self.is_read_paused = False
                self.transport.resume_reading()

    def _pause_reading(self) -> None:
        if not self.is_read_paused:
            self.is_read_paused = True
            self.transport.pause_reading()

    def _grow_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")

    def _refuse(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answered when no response is in progress, then the connection closes."""
        self.is_closing = True
        self.is_refused = True
        self.pending.clear()
        self.incoming = None
        self._pause_reading()
        active = self.active
        if active is None:
            self.transport.write(error_response(status, message))
            self.transport.close()
        elif active.is_body_complete:
            active.keep_alive = False  # its response goes out, then the connection closes
        else:  # the active request's own body is malformed
            active.is_disconnected = True
            active.waiter.wake()
            self.transport.close()

    def checked_name(self, name: bytes) -> bytes:
        """The lower-cased header name, validated once per distinct name (a bounded cache)."""
        lower = self.names.get(name)
        if lower is None:
            if not _TOKEN.fullmatch(name):
                raise RuntimeError(f"invalid response header name {name!r}")
            lower = name.lower()
            if len(self.names) < 256:
                self.names[name] = lower
        return lower

    def _on_body_timeout(self) -> None:
        """The incoming request's body did not arrive in time: 408 if its app has not answered, then close."""
        self.body_timer = None
        cycle = self.incoming
        if cycle is None or self.is_closing:
            return
        log.info("request body not received within %ss: closing the connection", self.body_timeout)
        if cycle is self.active and not cycle.is_response_started:
            self.transport.write(error_response(408, "The request body was not received in time."))
        self.is_closing = True
        for waiting in (self.active, *self.pending, cycle):
            if waiting is not None and not waiting.is_response_complete:
                waiting.is_disconnected = True
                waiting.waiter.wake()
        self.transport.close()

    def _cancel_body_timer(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _arm_idle_timer(self, delay: float) -> None:
        # One timer per connection, not one per request: when it fires it checks how long the
        # connection has really been idle and re-arms itself for the rest.
        self.idle_timer = self.loop.call_later(delay, self._check_idle)

    def _cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _check_idle(self) -> None:
        self.idle_timer = None
        if self.is_closing:
            return
        if self.active is not None or self.pending or self.incoming is not None:
            self._arm_idle_timer(self.keep_alive_timeout)  # busy: look again later
            return
        idle_for = self.loop.time() - self.idle_since
        if idle_for >= self.keep_alive_timeout:
            self.transport.close()
        else:
            self._arm_idle_timer(self.keep_alive_timeout - idle_for)

    def shutdown(self) -> None:
        """uvicorn's graceful-shutdown hook: idle connections close now, busy ones after their response."""
        self.is_closing = True
        if self.active is None:
            self.transport.close()
        else:
            self.active.keep_alive = False
            self.pending.clear()

