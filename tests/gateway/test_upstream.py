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
