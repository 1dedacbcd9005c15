"""A small pooled HTTP/1.1 client for backends, built on asyncio protocols and `httptools`.

Why not aiohttp/httpx: on the gateway's hot path their per-request bookkeeping costs more than the
proxying itself (see benchmarks/gateway_overhead.py). This client does only what the gateway needs:
keep-alive pools per origin, a connect timeout, a first-byte timeout, and a body delivered chunk by
chunk as it arrives (SSE pass-through), with back-pressure.

Invariant: a connection is in its origin's idle list only when its last response was read to the
end, the server allowed keep-alive, the socket is open, and no byte arrived past that response. A
byte past a response (a second response nobody asked for, as a request smuggled upstream would
produce) closes the connection at once: reused, it would hand that response to the next request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from lmserve.gateway.waiter import Waiter


class UpstreamError(Exception):
    """The backend could not be reached or broke the response.

    `is_connect`: no connection was made, so no request byte was sent (safe to retry anywhere, free).
    `is_unanswered`: the request was sent and the connection closed before any response byte (the
    backend may have started on it). `is_timeout`: a deadline passed."""

    def __init__(self, message: str, is_connect: bool = False, is_timeout: bool = False,
                 is_unanswered: bool = False) -> None:
        super().__init__(message)
        self.is_connect = is_connect
        self.is_timeout = is_timeout
        self.is_unanswered = is_unanswered


_HIGH_WATER = 256 * 1024


class _Connection(asyncio.Protocol):
    """One keep-alive TCP connection; parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.is_open = False
        self.waiter = Waiter(loop)
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.is_receiving = False
        """A byte of the current response arrived."""
        self.is_head_done = False
        self.is_keep_alive = False
        self.is_complete = False
        self.error: UpstreamError | None = None
        self.is_paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.is_open = True

    def data_received(self, data: bytes) -> None:
        if self.is_complete:
            self._discard()  # bytes after the response (or while idle in the pool)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad response from backend: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        if not self.is_complete:
            self._fail(UpstreamError("backend closed the connection", is_unanswered=not self.is_receiving))

    def _discard(self) -> None:
        """Never reuse this connection: its byte stream is out of step with its requests."""
        self.is_open = False
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.is_complete:
            # A second response in the same read as the first: raising stops the parser here.
            self._discard()
            raise UpstreamError("backend sent a response nobody asked for")
        self.is_receiving = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Read here: llhttp resets its flags once the message completes.
        self.is_keep_alive = self.parser.should_keep_alive()
        self.is_head_done = True
        self.waiter.wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.is_paused and self.transport is not None:
            self.is_paused = True
            self.transport.pause_reading()
        self.waiter.wake()

    def on_message_complete(self) -> None:
        self.is_complete = True
        self.waiter.wake()

    def on_first_chunk_timeout(self) -> None:
        if not self.chunks and not self.is_complete:
            self._fail(UpstreamError("backend sent no body byte in time", is_timeout=True))

    def on_head_timeout(self) -> None:
        if not self.is_head_done:
            self._fail(UpstreamError("backend sent no response head in time", is_timeout=True))

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.waiter.wake()

    def take_chunk(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.is_paused and self.buffered < _HIGH_WATER // 2 and self.transport is not None:
            self.is_paused = False
            self.transport.resume_reading()
        return chunk


@dataclass
class _Origin:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    idle: list[_Connection] = field(default_factory=list)
    host_header: bytes = field(init=False)
    """The `Host` header value, made once per origin rather than per request."""

    def __post_init__(self) -> None:
        self.host_header = self.host.encode() + b":" + str(self.port).encode()


class UpstreamResponse:
    """A response whose head has arrived; the body is read with `chunks()` or `read()`.
    `release()` must be called once (it returns the connection to the pool when reusable)."""

    def __init__(self, pool: UpstreamPool, origin: _Origin, conn: _Connection) -> None:
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._is_released = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def chunks(self):  # type: ignore[no-untyped-def]
        """Yields body chunks as they arrive; raises UpstreamError if the backend breaks off."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take_chunk()
                continue
            if conn.is_complete:
                return
            if conn.error is not None:
                raise conn.error
            await conn.waiter.wait()

    async def first_chunk(self, timeout: float) -> bytes | None:
        """The first body chunk (None for an empty body), waiting at most `timeout` seconds."""
        conn = self._conn
        timer = conn.loop.call_later(timeout, conn.on_first_chunk_timeout)
        try:
            while not conn.chunks:
                if conn.is_complete:
                    return None
                if conn.error is not None:
                    raise conn.error
                await conn.waiter.wait()
        finally:
            timer.cancel()
        return conn.take_chunk()

    async def read(self) -> bytes:
        """The whole body (usually already here: small responses arrive with their head)."""
        conn = self._conn
        parts = []
        while True:
            while conn.chunks:
                parts.append(conn.take_chunk())
            if conn.is_complete:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if conn.error is not None:
                raise conn.error
            await conn.waiter.wait()

    def release(self) -> None:
        if self._is_released:
            return
        self._is_released = True
        conn = self._conn
        reusable = (conn.is_complete and conn.error is None and conn.is_open
                    and conn.is_keep_alive and not conn.chunks)
        if reusable and len(self._origin.idle) < self._pool.max_idle:
            # Not reset until taken: while idle, `is_complete` makes any byte that arrives close it.
            conn.idle_since = conn.loop.time()
            self._origin.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()


class UpstreamPool:
    """Keep-alive connection pools, one per backend origin (scheme, host, port)."""

    def __init__(self, max_idle_per_origin: int = 256, max_idle_seconds: float = 4.0) -> None:
        self._origins: dict[str, _Origin] = {}
        self.max_idle = max_idle_per_origin
        self.max_idle_seconds = max_idle_seconds
        """Idle connections older than this are closed rather than reused: below the 5 s keep-alive
        of uvicorn-based servers (lmserve, vLLM), so a request rarely goes out on a connection that
        the backend is closing (a POST that meets that race is not resent here; see `request`)."""

    def _origin(self, base_url: str) -> _Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            parts = urlsplit(base_url)
            is_tls = parts.scheme == "https"
            origin = _Origin(parts.hostname or "127.0.0.1", parts.port or (443 if is_tls else 80),
                             ssl.create_default_context() if is_tls else None)
            self._origins[base_url] = origin
        return origin

    async def _connect(self, origin: _Origin, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), origin.host, origin.port,
                                       ssl=origin.ssl_context), timeout)
        except asyncio.TimeoutError as exc:
            raise UpstreamError(f"connect to {origin.host}:{origin.port} timed out",
                                is_connect=True, is_timeout=True) from exc
        except OSError as exc:
            raise UpstreamError(f"connect to {origin.host}:{origin.port} failed: {exc}", is_connect=True) from exc
        return conn

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = origin.idle
        while idle:
            conn = idle.pop()  # the most recently released one
            if conn.loop.time() - conn.idle_since > self.max_idle_seconds:
                for stale in (conn, *idle):  # released earlier still: all too old
                    if stale.transport is not None:
                        stale.transport.close()
                idle.clear()
                return None
            if conn.is_open and conn.transport is not None and not conn.transport.is_closing():
                conn._reset()
                return conn
        return None

    async def request(self, base_url: str, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes, connect_timeout: float, head_timeout: float | None) -> UpstreamResponse:
        """Sends a request and waits for the response head, at most `head_timeout` seconds (None: no
        limit here; the caller bounds the whole request). A GET on a reused keep-alive connection that
        the backend closed without answering is resent once on a fresh one (the race of a backend
        closing an idle connection as a request goes out). Other methods are not resent here: the
        backend may have read the request before closing, so the caller's retry budget decides.
        `path` must be a constant route path (routes.py): it is written into the request line as it is."""
        origin = self._origin(base_url)
        for attempt in range(2):
            conn = self._take_idle(origin) if attempt == 0 else None
            is_reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout)
            self._send(conn, origin, method, path, headers, body)
            try:
                await self._wait_head(conn, head_timeout)
            except UpstreamError as exc:
                if conn.transport is not None:
                    conn.transport.close()
                if is_reused and exc.is_unanswered and method == b"GET":
                    continue
                raise
            except BaseException:
                if conn.transport is not None:
                    conn.transport.close()
                raise
            return UpstreamResponse(self, origin, conn)
        raise UpstreamError("unreachable", is_connect=True)

    @staticmethod
    def _send(conn: _Connection, origin: _Origin, method: bytes, path: bytes,
              headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        lines = [method, b" ", path, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\ncontent-length: ",
                 str(len(body)).encode(), b"\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        lines += (b"\r\n", body)
        if conn.transport is None:
            raise UpstreamError("connection has no transport", is_connect=True)
        conn.transport.write(b"".join(lines))

    @staticmethod
    async def _wait_head(conn: _Connection, timeout: float | None) -> None:
        # A timer handle is much cheaper than asyncio.wait_for (no extra task per request).
        timer = conn.loop.call_later(timeout, conn.on_head_timeout) if timeout is not None else None
        try:
            while not conn.is_head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.waiter.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        for origin in self._origins.values():
            for conn in origin.idle:
                if conn.transport is not None:
                    conn.transport.close()
            origin.idle.clear()
