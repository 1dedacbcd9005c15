"""Refusals, ownership, cancel and expiry: a gateway whose only backend is down, so no batch can finish."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.batch.conftest import chat_lines, gateway_config, jsonl, wait_for
from tests.services import free_port

GOOD = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}}


def _line(**changes: object) -> bytes:
    return orjson.dumps({**GOOD, **changes}) + b"\n"


@pytest.fixture
def gateway(gateway_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    return gateway_factory(gateway_config(tmp_path, [f"http://127.0.0.1:{free_port()}"], max_file_bytes=4096))


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.mark.parametrize(("content", "line", "param", "fragment"), [
    (_line() + _line(), 2, "custom_id", "duplicate custom_id 'a'"),
    (_line(custom_id="b") + _line(method="GET"), 2, "method", "`method` must be \"POST\""),
    (_line(url="/v1/embeddings"), 1, "url", "`url` must be one of"),
    (_line(body={"messages": []}), 1, "body.model", "`body.model`"),
    (_line(body={"model": "demo", "stream": True}), 1, "body.stream", "not supported in a batch"),
    (b"\n" + _line(custom_id="x") + b"{not json\n", 3, "file", "invalid JSON"),
    (_line(custom_id=""), 1, "custom_id", "`custom_id` must be a non-empty string"),
])
def test_a_bad_line_is_a_400_that_names_it(gateway, content: bytes, line: int, param: str, fragment: str) -> None:
    client = _client(gateway.url, gateway.create_key(name="bad-lines"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("input.jsonl", content), purpose="batch")
    error = caught.value.body
    assert error["code"] == "invalid_batch_input" and error["param"] == param
    assert f"line {line}: " in error["message"] and fragment in error["message"], error
    assert client.files.list().data == []


def test_upload_refusals(gateway) -> None:
    client = _client(gateway.url, gateway.create_key(name="uploads"))
    with pytest.raises(openai.BadRequestError, match="purpose must be"):
        client.files.create(file=("input.jsonl", _line()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="has no requests"):
        client.files.create(file=("input.jsonl", b"\n\n"), purpose="batch")
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("input.jsonl", chat_lines(40)), purpose="batch")  # over max_file_bytes
    assert caught.value.status_code == 413
    upload = client.files.create(file=("input.jsonl", _line()), purpose="batch")
    for kwargs, param in (({"endpoint": "/v1/embeddings", "completion_window": "24h"}, "endpoint"),
                          ({"endpoint": "/v1/chat/completions", "completion_window": "48h"}, "completion_window")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id=upload.id, **kwargs)  # type: ignore[arg-type]
        assert refused.value.body["param"] == param


def test_files_and_batches_are_their_owners(gateway) -> None:
    owner = _client(gateway.url, gateway.create_key(name="owner"))
    other = _client(gateway.url, gateway.create_key(name="other"))
    upload = owner.files.create(file=("input.jsonl", _line()), purpose="batch")
    batch = owner.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: other.files.retrieve(upload.id), lambda: other.files.content(upload.id),
                 lambda: other.files.delete(upload.id), lambda: other.batches.retrieve(batch.id),
                 lambda: other.batches.cancel(batch.id),
                 lambda: other.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.files.list().data == [] and other.batches.list().data == []
    assert owner.batches.retrieve(batch.id).id == batch.id

    # Keys of one tenant share their files and batches.
    first = _client(gateway.url, gateway.create_key(name="t1", tenant="team"))
    second = _client(gateway.url, gateway.create_key(name="t2", tenant="team"))
    shared = first.files.create(file=("input.jsonl", _line()), purpose="batch")
    assert second.files.retrieve(shared.id).id == shared.id
    assert second.files.delete(shared.id).deleted
    with pytest.raises(openai.NotFoundError):
        first.files.retrieve(shared.id)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_cancel_in_progress_writes_every_request_to_the_error_file(gateway_factory, tmp_path: Path, request,
                                                                  database: str) -> None:
    config = gateway_config(tmp_path, [f"http://127.0.0.1:{free_port()}"])
    if database == "postgresql":
        config["database_url"] = request.getfixturevalue("postgres_url")
    gateway = gateway_factory(config)
    client = _client(gateway.url, gateway.create_key(name="cancel"))
    upload = client.files.create(file=("input.jsonl", chat_lines(5)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).status == "in_progress", 30, "in_progress")
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "cancelled" and b, 30, "cancelled")
    assert done.cancelling_at and done.cancelled_at and done.output_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 0, 5)
    errors = jsonl(client.files.content(done.error_file_id).content)
    assert sorted(e["custom_id"] for e in errors) == [f"req-{i}" for i in range(5)]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"} and all(e["response"] is None for e in errors)
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling twice changes nothing
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [batch.id] and not page.has_more


def test_window_passes_and_the_batch_expires(gateway) -> None:
    client = _client(gateway.url, gateway.create_key(name="expiry"))
    upload = client.files.create(file=("input.jsonl", chat_lines(3)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="2s")
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "expired" and b, 30, "expired")
    assert done.expired_at and done.expires_at == done.created_at + 2
    errors = jsonl(client.files.content(done.error_file_id).content)
    assert sorted(e["custom_id"] for e in errors) == ["req-0", "req-1", "req-2"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_list_pages_with_after(gateway) -> None:
    client = _client(gateway.url, gateway.create_key(name="pages"))
    upload = client.files.create(file=("input.jsonl", _line()), purpose="batch")
    ids = [client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert first.has_more and len(first.data) == 2
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert not rest.has_more
    assert sorted(b.id for b in first.data + rest.data) == sorted(ids)
    assert [b.id for b in client.batches.list(limit=10)] == [b.id for b in first.data + rest.data]
    response = httpx.get(gateway.url + "/v1/batches", params={"limit": "0"},
                         headers={"authorization": f"Bearer {gateway.create_key(name='x')}"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "limit"


def test_batch_routes_need_a_key(gateway) -> None:
    for method, path in (("GET", "/v1/files"), ("GET", "/v1/batches"), ("POST", "/v1/batches"),
                         ("GET", "/v1/files/file-x/content")):
        response = httpx.request(method, gateway.url + path, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
