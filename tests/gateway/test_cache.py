"""The response cache stores only complete answers (issue 14, item 4)."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from lmserve.gateway.cache import is_complete_answer
from tests.gateway.conftest import base_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_a_truncated_answer_is_neither_cached_nor_served_stale(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}],
                                     cache={"enabled": True, "ttl": 60.0, "stale_ttl": 600.0}))
    headers = {"authorization": f"Bearer {gw.create_key()}"}
    with httpx.Client(timeout=30, headers=headers) as client:
        a.control(finish_reason="timeout")
        for _ in range(2):
            answer = client.post(gw.url + "/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200 and "x-lmserve-cache" not in answer.headers
        assert a.stats()["requests"] == 2  # the second went to the backend too
        a.control(status=503, fail_count=-1)
        assert client.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 503  # no stale copy
        a.control(status=None, finish_reason="length")  # complete: cached as before
        client.post(gw.url + "/v1/chat/completions", json=CHAT)
        assert client.post(gw.url + "/v1/chat/completions", json=CHAT).headers["x-lmserve-cache"] == "hit"


def _answer(*reasons: str | None, **extra: object) -> bytes:
    return orjson.dumps({"object": "chat.completion", **extra,
                         "choices": [{"index": i, "finish_reason": r} for i, r in enumerate(reasons)]})


@pytest.mark.parametrize("data, is_complete", [
    (_answer("stop"), True), (_answer("length", "tool_calls"), True),
    (_answer("stop", "timeout"), False), (_answer("abort"), False), (_answer(None), False),
    (_answer(), False), (_answer("stop", error={"message": "x"}), False),
    (b'{"choices": [{"finish_reason": "stop"}', False), (b"[]", False),
])
def test_is_complete_answer(data: bytes, is_complete: bool) -> None:
    assert is_complete_answer(data) is is_complete
