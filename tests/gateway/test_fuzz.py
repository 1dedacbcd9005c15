"""Fuzzing the gateway (issue 14, item 7): schemathesis on its OpenAPI description, then raw malformed
HTTP over sockets. Over 10,000 cases in all: no 5xx from the gateway itself, no hang, and every
error an OpenAI error body. A slow-body client is cut by the client body timeout."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from pathlib import Path

import httptools
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from tests.gateway.conftest import base_config
from tests.gateway.openapi_gateway import gateway_openapi
from tests.gateway.raw_http_cases import generate

_NUM_RAW_CASES = 9400
_EXAMPLES = {"POST": 150, "GET": 40}  # at most, per operation and generation mode (POSTs get negative cases too)
_HANG_SECONDS = 20.0


@pytest.fixture
def fuzz_gateway(backends, gateway_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    backend = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "aliases": ["alias-m"],
                                                 "backends": [{"url": backend.url}]}],
                                     timeouts={"client_body": 1.0}, access_log=False))
    return gw, gw.create_key()


def _assert_error_body(status: int, body: bytes, context: object) -> None:
    assert status < 500, (status, body[:300], context)
    if status >= 400:
        error = orjson.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, (body[:300], context)


@pytest.mark.slow
def test_schemathesis_cases_get_no_server_error(fuzz_gateway) -> None:  # type: ignore[no-untyped-def]
    gw, key = fuzz_gateway
    schema = schemathesis.openapi.from_dict(gateway_openapi())
    headers = {"authorization": f"Bearer {key}"}
    num_cases = 0
    seen: set[int] = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if operation.method.upper() == "POST" \
            else [GenerationMode.POSITIVE]
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=_EXAMPLES[operation.method.upper()], deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:  # type: ignore[no-untyped-def]
                nonlocal num_cases
                num_cases += 1
                response = case.call(base_url=gw.url, headers=headers, timeout=_HANG_SECONDS)
                seen.add(response.status_code)
                _assert_error_body(response.status_code, response.content, (case.method, case.path, case.body))

            check()
    assert {200, 400, 404} <= seen
    print(f"schemathesis: {num_cases} cases, statuses {sorted(seen)}")
    assert num_cases >= 600  # with the 9,400 raw cases: over 10,000 in all (parameterless GETs give one case each)


class _Responses:
    """httptools callbacks collecting every response on a connection."""

    def __init__(self) -> None:
        self.done: list[tuple[int, bytes]] = []
        self.body = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.body = b""

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.body))


def _exchange(url: str, case: bytes) -> list[tuple[int, bytes]]:
    """Sends one raw case and reads until the gateway closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    responses = _Responses()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=_HANG_SECONDS) as sock:
        try:
            sock.sendall(case)
        except OSError:
            pass  # refused mid-send (a huge head): whatever came back is still checked
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"hang: no close after {time.monotonic() - started:.1f}s: {case[:200]!r}") from None
            if not data:
                break
            try:
                responses.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise AssertionError(f"unparsable response to {case[:200]!r}: {exc}") from None
    return responses.done


@pytest.mark.slow
def test_raw_malformed_http_gets_no_server_error_and_no_hang(fuzz_gateway) -> None:  # type: ignore[no-untyped-def]
    gw, key = fuzz_gateway
    cases = generate(seed=14, num_cases=_NUM_RAW_CASES, key=key.encode())
    statuses: dict[int, int] = {}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for case, responses in zip(cases, pool.map(lambda c: _exchange(gw.url, c), cases)):
            for status, body in responses:
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 200:
                    _assert_error_body(status, body, case[:300])
    print(f"raw: {len(cases)} cases, statuses {sorted(statuses.items())}")
    assert {200, 400, 404, 431} <= set(statuses)
    # The gateway still serves normally afterwards.
    assert _exchange(gw.url, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")[0][0] == 200


def test_slow_body_is_cut_with_408(fuzz_gateway) -> None:  # type: ignore[no-untyped-def]
    gw, key = fuzz_gateway
    host, port = gw.url.removeprefix("http://").split(":")
    for drip in (False, True):
        with socket.create_connection((host, int(port)), timeout=_HANG_SECONDS) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key.encode()
                         + b"\r\ncontent-length: 100\r\n\r\n{\"model\"")
            started = time.monotonic()
            data = b""
            while True:
                if drip:  # a byte now and then does not extend the deadline
                    try:
                        sock.send(b" ")
                    except OSError:
                        pass
                    sock.settimeout(0.2)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    assert time.monotonic() - started < _HANG_SECONDS, "the slow body was never cut"
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert orjson.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
