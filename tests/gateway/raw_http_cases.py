"""Malformed and unusual HTTP/1.1 requests as raw bytes, drawn from a seeded generator (test_fuzz.py).

Kinds: bad request lines, odd targets (percent-encodings, absolute form, very long), huge or broken
headers, conflicting framing (content-length with transfer-encoding, two lengths), chunked bodies
(valid, split oddly, broken), pipelined batches, and byte-level mutations of a valid request. Every
case ends with a sentinel `GET /health` with `connection: close`, so the server closes the
connection once it has answered everything (or sooner, after a refusal); a body left incomplete is
ended by the gateway's client body timeout.
"""

from __future__ import annotations

import random
from collections.abc import Callable

SENTINEL = b"GET /health HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n\r\n"
_BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
_METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"BREW", b"G\x00T", b""]
_PATHS = [b"/v1/chat/completions", b"/v1/completions", b"/v1/models", b"/health", b"/ready", b"/metrics",
          b"/admin/backends", b"/v1/embeddings", b"/", b"*", b"/v1/../admin/keys", b"/v1/chat/completions?x=1"]


def _request(key: bytes, method: bytes = b"POST", target: bytes = b"/v1/chat/completions",
             body: bytes = _BODY, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (method + b" " + target + b" " + version + b"\r\nhost: fuzz\r\nauthorization: Bearer " + key
            + b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n"
            + extra + b"\r\n" + body)


def _bad_request_line(rng: random.Random, key: bytes) -> bytes:
    forms = [
        lambda: rng.choice(_METHODS) + b" " + rng.choice(_PATHS) + b" " + rng.choice(
            [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"HTTP/1", b"http/1.1", b"", b"HTTP/1.1 extra"]),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
        lambda: b"POST  /v1/chat/completions  HTTP/1.1",
        lambda: b"\r\n\r\nPOST /v1/chat/completions HTTP/1.1",
        lambda: rng.choice(_METHODS) + b" http://evil.example" + rng.choice(_PATHS) + b" HTTP/1.1",
    ]
    line = rng.choice(forms)()
    return line + b"\r\nhost: fuzz\r\nauthorization: Bearer " + key + b"\r\ncontent-length: 0\r\n\r\n"


def _odd_target(rng: random.Random, key: bytes) -> bytes:
    pieces = [b"%", b"%0", b"%zz", b"%00", b"%0a", b"%0D%0A", b"%20", b"%7f", b"%ff", b"%c3%a9", b"..", b"//",
              b"?", b"#", b";", b"\xc3\xa9", b"a" * rng.randrange(1, 80000, 1000)]
    target = rng.choice(_PATHS) + b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 5)))
    if rng.random() < 0.3:
        target = b"/v1/" + b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 4)))
    return _request(key, rng.choice([b"POST", b"GET"]), target)


def _headers(rng: random.Random, key: bytes) -> bytes:
    forms = [
        lambda: b"x-big: " + b"a" * rng.choice([8000, 70000, 200000]) + b"\r\n",
        lambda: b"".join(b"x-h%d: v\r\n" % i for i in range(rng.choice([100, 1000, 5000]))),
        lambda: b"no-colon-here\r\n",
        lambda: b" folded: continuation\r\n",
        lambda: b"x-a:" + bytes(rng.randrange(256) for _ in range(8)) + b"\r\n",
        lambda: b"content-length: 5\r\n",
        lambda: b"transfer-encoding: chunked\r\n",
        lambda: b"transfer-encoding: gzip, chunked\r\n",
        lambda: b"expect: 100-continue\r\n",
        lambda: b"connection: upgrade\r\nupgrade: websocket\r\n",
        lambda: b"x-request-id: " + rng.choice([b"ok-id", b"a" * 300, b"\xff\xfe", b"id with spaces"]) + b"\r\n",
        lambda: b"x-priority: " + rng.choice([b"high", b"low", b"-1000", b""]) + b"\r\n",
        lambda: b"authorization: Bearer wrong\r\n",
    ]
    extra = b"".join(rng.choice(forms)() for _ in range(rng.randrange(1, 3)))
    return _request(key, extra=extra)


def _chunked(rng: random.Random, key: bytes) -> bytes:
    body = _BODY if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(rng.randrange(50)))
    parts, i = [], 0
    while i < len(body):
        size = rng.randrange(1, 20)
        parts.append(b"%x\r\n" % len(body[i:i + size]) + body[i:i + size] + b"\r\n")
        i += size
    tail = rng.choice([b"0\r\n\r\n", b"0\r\nx-trailer: 1\r\n\r\n", b"zz\r\n\r\n", b"0;ext=1\r\n\r\n",
                       b"fffffffffffffffff\r\n\r\n", b"-1\r\n\r\n"])
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: fuzz\r\nauthorization: Bearer " + key
            + b"\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n")
    if rng.random() < 0.2:
        head += b"content-length: " + str(len(body)).encode() + b"\r\n"  # CL.TE: must not desync
    return head + b"\r\n" + b"".join(parts) + tail


def _pipelined(rng: random.Random, key: bytes) -> bytes:
    makers = [_valid, _odd_target, _headers, _chunked]
    return b"".join(rng.choice(makers)(rng, key) for _ in range(rng.randrange(2, 8)))


def _valid(rng: random.Random, key: bytes) -> bytes:
    body = rng.choice([_BODY, _BODY.replace(b"}]}", b'}], "stream": true}'), b'{"model": "m", "prompt": "x"}',
                       b"{}", b"[]", b"null", b"{", b'{"model": 1}', b'{"model": "missing"}'])
    target = b"/v1/completions" if b"prompt" in body else b"/v1/chat/completions"
    return _request(key, body=body, target=target)


def _mutated(rng: random.Random, key: bytes) -> bytes:
    data = bytearray(_valid(rng, key))
    for _ in range(rng.randrange(1, 6)):
        where = rng.randrange(len(data))
        action = rng.randrange(3)
        if action == 0:
            data[where] = rng.randrange(256)
        elif action == 1:
            del data[where]
        else:
            data.insert(where, rng.choice(b"\r\n\x00 :%/"))
    return bytes(data)


KINDS: list[Callable[[random.Random, bytes], bytes]] = [
    _bad_request_line, _odd_target, _headers, _chunked, _pipelined, _valid, _mutated]


def generate(seed: int, num_cases: int, key: bytes) -> list[bytes]:
    """`num_cases` cases, each followed by the sentinel, drawn evenly from every kind."""
    rng = random.Random(seed)
    return [KINDS[i % len(KINDS)](rng, key) + SENTINEL for i in range(num_cases)]
