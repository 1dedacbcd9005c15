"""The gateway's HTTP/1.1 server protocol (lmserve/gateway/http11.py) on a real uvicorn server.

A small ASGI app runs in a uvicorn server on a thread of this process, with `http=HTTP11Protocol`;
clients are raw sockets (to see the bytes on the wire) and httpx.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from lmserve.gateway.http11 import HTTP11Protocol
from tests.services import free_port

_EVENTS: list[str] = []


async def _read_all(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"part%d;" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/error":
        raise RuntimeError("secret traceback detail")
    elif path == "/bad-header":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1\r\nset-cookie: evil")]})
        await send({"type": "http.response.body", "body": b"no"})
    elif path == "/wait-disconnect":
        await _read_all(receive)
        message = await receive()  # the body is read: the next message is the disconnect
        _EVENTS.append(message["type"])
    elif path == "/too-long":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"abc"})
    elif path == "/no-content":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b"MUST-NOT-APPEAR"})
    elif path == "/early":
        await receive()  # the first part of the body, then the answer, then the rest never comes
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        _EVENTS.append((await receive())["type"])
    elif path == "/big":
        chunk = b"x" * 65536
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(chunk) * 128).encode())]})
        for i in range(128):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < 127})
    else:
        body = await _read_all(receive)
        payload = orjson.dumps({"method": scope["method"], "path": path, "query": scope["query_string"].decode(),
                                "body_len": len(body), "body_head": body[:16].decode("latin-1"),
                                "http_version": scope["http_version"],
                                "headers": {k.decode(): v.decode() for k, v in scope["headers"]}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http=HTTP11Protocol, lifespan="off", loop="uvloop",
                            log_level="warning", timeout_keep_alive=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    yield f"127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def _connect(server: str) -> socket.socket:
    host, port = server.split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def _recv_until_closed(sock: socket.socket) -> bytes:
    parts = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(parts)
        parts.append(data)


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, bytes]:
    """One response with a content-length from `sock` (bytes past it stay in `buffer`)."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed early: {bytes(buffer)!r}")
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(buffer) < end + length:
        buffer += sock.recv(65536)
    body = bytes(buffer[end:end + length])
    del buffer[:end + length]
    return head, body


def _post(path: str, body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: t\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n" + extra + b"\r\n" + body)


def test_keep_alive_and_head_and_body_in_one_response(server: str) -> None:
    with _connect(server) as sock:
        buffer = bytearray()
        for i in range(3):
            sock.sendall(_post(f"/echo/{i}?q={i}", b'{"n":%d}' % i))
            head, body = _read_response(sock, buffer)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"content-type: application/json" in head and b"transfer-encoding" not in head
            echoed = orjson.loads(body)
            assert (echoed["path"], echoed["query"], echoed["body_head"]) == (f"/echo/{i}", f"q={i}", f'{{"n":{i}}}')
            assert echoed["headers"]["host"] == "t" and echoed["http_version"] == "1.1"


def test_pipelined_requests_are_answered_in_order(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"".join(_post(f"/p/{i}", b"x" * i) for i in range(5)))
        buffer = bytearray()
        paths = [orjson.loads(_read_response(sock, buffer)[1])["path"] for _ in range(5)]
    assert paths == [f"/p/{i}" for i in range(5)]


def test_chunked_and_large_request_bodies(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        echoed = orjson.loads(_read_response(sock, bytearray())[1])
    assert (echoed["body_len"], echoed["body_head"]) == (11, "hello world")
    big = b"y" * (3 * 1024 * 1024)  # well over the read high-water mark: reading pauses and resumes
    response = httpx.post(f"http://{server}/big-upload", content=big, timeout=30)
    assert response.json()["body_len"] == len(big)


def test_expect_100_continue(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /e HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
        interim = sock.recv(1024)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abcd")
        echoed = orjson.loads(_read_response(sock, bytearray())[1])
    assert echoed["body_head"] == "abcd"


def test_streamed_response_is_chunked(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            data += sock.recv(65536)
    assert b"transfer-encoding: chunked\r\n" in data
    assert data.split(b"\r\n\r\n", 1)[1] == b"6\r\npart0;\r\n6\r\npart1;\r\n6\r\npart2;\r\n0\r\n\r\n"
    with httpx.stream("GET", f"http://{server}/stream") as response:
        assert b"".join(response.iter_bytes()) == b"part0;part1;part2;"


def test_head_request_has_no_body(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"HEAD /h HTTP/1.1\r\nhost: t\r\n\r\nGET /after HTTP/1.1\r\nhost: t\r\n\r\n")
        buffer = bytearray()
        while buffer.count(b"\r\n\r\n") < 2:
            buffer += sock.recv(65536)
        first_end = buffer.index(b"\r\n\r\n") + 4
        assert b"content-length" in buffer[:first_end]
        assert buffer[first_end:].startswith(b"HTTP/1.1 200 OK")  # the next response follows the head at once


def test_http10_without_keep_alive_closes(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /stream HTTP/1.0\r\n\r\n")
        data = _recv_until_closed(sock)
    assert b"connection: close" in data and b"transfer-encoding" not in data
    assert data.endswith(b"\r\n\r\npart0;part1;part2;")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"NOT A REQUEST\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
])
def test_malformed_requests_get_an_error_and_close(server: str, request_bytes: bytes, status: bytes) -> None:
    with _connect(server) as sock:
        sock.sendall(request_bytes)
        data = _recv_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 " + status) and b"connection: close" in data
    error = orjson.loads(data.partition(b"\r\n\r\n")[2])["error"]
    assert set(error) == {"message", "type", "param", "code"}


def test_app_errors_give_500_without_details(server: str) -> None:
    response = httpx.get(f"http://{server}/error")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert "secret" not in response.text
    for path, leak in ((b"/bad-header", b"evil"), (b"/too-long", b"abc")):
        with _connect(server) as sock:
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nhost: t\r\n\r\n")
            data = _recv_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 500") and leak not in data


def test_client_disconnect_reaches_the_app(server: str) -> None:
    _EVENTS.clear()
    with _connect(server) as sock:
        sock.sendall(_post("/wait-disconnect"))
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while not _EVENTS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _EVENTS == ["http.disconnect"]


def test_idle_keep_alive_connection_is_closed(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(_post("/idle"))
        _read_response(sock, bytearray())
        started = time.monotonic()
        assert sock.recv(1024) == b""  # the server closes it after timeout_keep_alive (1 s)
        assert 0.5 < time.monotonic() - started < 4


def test_large_response_to_a_slow_reader(server: str) -> None:
    async def slow_read() -> int:
        host, port = server.split(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 16)
        writer.write(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        received = 0
        while received < length:
            received += len(await reader.read(65536))
            await asyncio.sleep(0.001)
        writer.close()
        return received

    assert asyncio.run(slow_read()) == 128 * 65536


def test_upgrade_request_is_answered_as_plain_http_then_closed(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /up HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        data = _recv_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in data
    assert b'"path":"/up"' in data


def test_header_line_that_never_ends_is_refused(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: t\r\nx-big: ")
        refused = b""
        for _ in range(40):  # up to 160 KiB of one unterminated header value, 4 KiB at a time
            try:
                sock.sendall(b"a" * 4096)
            except OSError:
                break
            time.sleep(0.002)
        refused = _recv_until_closed(sock)
    assert refused.startswith(b"HTTP/1.1 431")


def test_bodyless_statuses_and_early_answers(server: str) -> None:
    with _connect(server) as sock:  # a body given with a 204 never reaches the wire
        sock.sendall(b"GET /no-content HTTP/1.1\r\nhost: t\r\n\r\nGET /after HTTP/1.1\r\nhost: t\r\n\r\n")
        buffer = bytearray()
        while b'"path":"/after"' not in buffer:
            buffer += sock.recv(65536)
    assert buffer.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert buffer.split(b"\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 200 OK")
    _EVENTS.clear()
    with _connect(server) as sock:  # answered before the body arrived: receive() then says disconnect
        sock.sendall(b"POST /early HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n0123456789")
        data = _recv_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 413")
    deadline = time.monotonic() + 5
    while not _EVENTS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _EVENTS == ["http.disconnect"]
