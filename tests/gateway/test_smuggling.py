"""Request smuggling through the gateway (issue 14, item 1): what the client wrote never reaches the
backend as a second request, control bytes are refused, and a backend connection with bytes past
its response is never reused."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import orjson
import pytest

from tests.gateway.conftest import base_config
from tests.gateway.recording_backend import _response, completion, recording_backend

_SMUGGLED = (b"/v1/chat/completions%20HTTP/1.1%0D%0AHost:%20b%0D%0AContent-Length:%200%0D%0A%0D%0A"
             b"GET%20/anything")
_BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def _raw(url: str, request: bytes) -> tuple[int, bytes]:
    """Sends `request` on a fresh socket; returns the status and the body of the response."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(head.split(b" ")[1]), body


def _post(target: bytes, key: str, body: bytes = _BODY, extra: bytes = b"") -> bytes:
    return (b"POST " + target + b" HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer " + key.encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n" + extra + b"\r\n" + body)


def _assert_openai_error(body: bytes) -> dict:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.fixture
def gateway_and_backend(gateway_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    with recording_backend() as backend:
        gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": backend.url}]}]))
        yield gw, backend, gw.create_key()


def test_smuggled_request_line_never_reaches_the_backend(gateway_and_backend) -> None:  # type: ignore[no-untyped-def]
    gw, backend, key = gateway_and_backend
    status, body = _raw(gw.url, _post(_SMUGGLED, key))
    assert status == 400
    _assert_openai_error(body)
    # A clean request on the same backend afterwards: it is the only one the backend ever parsed.
    status, body = _raw(gw.url, _post(b"/v1/chat/completions", key))
    assert status == 200, body
    assert backend.completions() == [(b"POST", b"/v1/chat/completions")]


def test_control_bytes_in_the_target_or_headers_are_refused(gateway_and_backend) -> None:  # type: ignore[no-untyped-def]
    gw, backend, key = gateway_and_backend
    for target in (b"/v1/chat/completions%00", b"/v1/chat/completions?x=%0a", b"/v1/x%7F",
                   b"/v1/chat/completions%0d%0aGET%20/x", b"/v1/chat/completions\x01"):
        status, body = _raw(gw.url, _post(target, key))
        assert status == 400, target
        assert _assert_openai_error(body)["type"] == "invalid_request_error"
    for header in (b"x-a: a\x01b\r\n", b"x-a: a\x00b\r\n", b"x-a: a\x7fb\r\n", b"x\x01a: b\r\n",
                   b"x-a: a\rb\r\n", b"x-a: a\nb\r\n"):
        status, body = _raw(gw.url, _post(b"/v1/chat/completions", key, extra=header))
        assert status == 400, header
        _assert_openai_error(body)
    assert backend.completions() == []


def test_only_known_routes_are_forwarded_in_canonical_form(gateway_and_backend) -> None:  # type: ignore[no-untyped-def]
    gw, backend, key = gateway_and_backend
    for target in (b"/v1/embeddings", b"/v1/chat/completions/../../admin", b"/v1/chat/completions%20x",
                   b"/v1/x%20HTTP/1.1"):
        status, body = _raw(gw.url, _post(target, key))
        assert status == 404, target
        assert _assert_openai_error(body)["code"] == "not_found"
    assert backend.completions() == []
    # A percent-encoded spelling of a known route is forwarded under the route's own bytes.
    status, body = _raw(gw.url, _post(b"/v1/chat/%63ompletions", key))
    assert status == 200, body
    assert backend.completions() == [(b"POST", b"/v1/chat/completions")]


def test_connection_with_bytes_past_its_response_is_not_reused(gateway_and_backend) -> None:  # type: ignore[no-untyped-def]
    gw, backend, key = gateway_and_backend
    # The backend answers, then writes a second, unsolicited response on the same connection.
    backend.extra_response = _response(completion("SMUGGLED"))
    other_key = gw.create_key(tenant="other")
    with httpx.Client(timeout=10) as client:
        for k in (key, other_key, key, other_key):
            response = client.post(gw.url + "/v1/chat/completions", content=_BODY,
                                   headers={"authorization": f"Bearer {k}", "content-type": "application/json"})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "recorded"
