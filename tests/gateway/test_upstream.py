"""The pooled upstream client against a scripted HTTP server (an asyncio server in this process)."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.gateway.upstream import UpstreamError, UpstreamPool


async def _serve(responses: list[bytes], close_after: bool = False):
    """A server answering each request on a connection with the next scripted response."""
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while responses:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(responses.pop(0))
            await writer.drain()
            if close_after:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", connections


def test_keep_alive_reuse_and_chunked_bodies() -> None:
    async def run() -> None:
        chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        plain = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nx-a: b\r\n\r\nok"
        server, url, connections = await _serve([chunked, plain])
        pool = UpstreamPool()
        response = await pool.request(url, b"POST", b"/x", [], b"{}", 1, 1)
        assert response.status == 200 and [c async for c in response.chunks()] in ([b"hello", b" world"],
                                                                                 [b"hello world"])
        response.release()
        response = await pool.request(url, b"POST", b"/x", [], b"{}", 1, 1)
        assert (response.status, await response.read(), response.header(b"x-a")) == (201, b"ok", b"b")
        response.release()
        assert len(connections) == 1  # the second request reused the first connection
        pool.close()
        server.close()

    asyncio.run(run())


def test_connection_closed_by_the_server_is_replaced() -> None:
    async def run() -> None:
        ok = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"
        server, url, connections = await _serve([ok, ok], close_after=True)
        pool = UpstreamPool()
        for _ in range(2):
            response = await pool.request(url, b"POST", b"/x", [], b"{}", 1, 1)
            assert await response.read() == b"a"
            response.release()
            await asyncio.sleep(0.05)
        assert len(connections) == 2
        server.close()

    asyncio.run(run())


def test_errors_connect_head_timeout_and_broken_body() -> None:
    async def run() -> None:
        pool = UpstreamPool()
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamError) as refused:
            await pool.request(f"http://127.0.0.1:{port}", b"POST", b"/", [], b"", 1, 1)
        assert refused.value.is_connect

        silent, url, _ = await _serve([])
        with pytest.raises(UpstreamError) as timeout:
            await pool.request(url, b"POST", b"/", [], b"{}", 1, 0.2)
        assert timeout.value.is_timeout and not timeout.value.is_connect
        silent.close()

        broken, url, _ = await _serve([b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"], close_after=True)
        response = await pool.request(url, b"POST", b"/", [], b"{}", 1, 1)
        with pytest.raises(UpstreamError):
            await response.read()
        response.release()
        broken.close()

    asyncio.run(run())


def test_bytes_past_a_response_close_the_connection() -> None:
    """A backend that writes a second response nobody asked for (as a request smuggled upstream would
    produce), in the same write or later while the connection sits idle: that connection is never
    reused, so the extra response never reaches the next request."""
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"
    smuggled = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED"

    async def run() -> None:
        is_late_sent = asyncio.Event()
        saw_eof = asyncio.Event()
        connections: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            number = len(connections)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
            if number == 1:
                writer.write(ok + smuggled)  # in the same write
            elif number == 2:
                writer.write(ok)
                await writer.drain()
                await is_late_sent.wait()
                writer.write(smuggled)  # later, while the connection is idle in the pool
                is_late_sent.clear()
            else:
                writer.write(ok)
            await writer.drain()
            if await reader.read() == b"":
                saw_eof.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = UpstreamPool()
        for number in (1, 2, 3):
            response = await pool.request(url, b"POST", b"/x", [], b"{}", 1, 1)
            assert await response.read() == b"a"
            response.release()
            if number == 2:
                is_late_sent.set()
                await asyncio.wait_for(saw_eof.wait(), 10)  # the pool closed the idle connection
        assert len(connections) == 3  # no connection was reused
        pool.close()
        server.close()

    asyncio.run(run())


def test_connection_closed_before_any_reply_is_unanswered_not_connect() -> None:
    async def run() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        with pytest.raises(UpstreamError) as closed:
            await UpstreamPool().request(url, b"POST", b"/x", [], b"{}", 1, None)
        # The request went out: retrying it is not free (it spends the retry budget).
        assert closed.value.is_unanswered and not closed.value.is_connect
        server.close()

    asyncio.run(run())
