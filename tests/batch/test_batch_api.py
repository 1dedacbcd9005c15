"""The Batch API end to end: the `openai` SDK against a gateway in front of two `lmserve serve demo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.batch.conftest import chat_lines, gateway_config, jsonl, wait_for
from tests.services import REPO_ROOT


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _batch_requests(servers) -> list[dict]:  # type: ignore[no-untyped-def]
    """The requests the servers ran at the low priority class (engine priority 1): batch requests."""
    return [e for s in servers for e in s.log_entries("request") if e.get("priority") == 1]


def test_round_trip_output_usage_and_low_priority(demo_backends, gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(gateway_config(tmp_path, [s.url for s in demo_backends]))
    created = gw.admin("POST", "/admin/keys", json={"name": "batcher"}).json()
    client = _client(gw.url, created["key"])
    before = len(_batch_requests(demo_backends))

    upload = client.files.create(file=("input.jsonl", chat_lines(6)), purpose="batch")
    assert (upload.purpose, upload.filename, upload.bytes) == ("batch", "input.jsonl", len(chat_lines(6)))
    assert client.files.content(upload.id).content == chat_lines(6)
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "round-trip"})
    assert batch.status == "validating" and batch.metadata == {"run": "round-trip"}
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b, 120,
                    "the batch to complete")
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 6, 0)
    assert done.error_file_id is None and done.in_progress_at and done.finalizing_at and done.completed_at

    lines = jsonl(client.files.content(done.output_file_id).content)
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(6)]
    for line in lines:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        assert line["response"]["body"]["object"] == "chat.completion"
    # The same request made interactively gives the same greedy answer.
    direct = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Tell me about number 3."}],
                                            max_tokens=8, temperature=0)
    assert lines[3]["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content

    # Every batch request reached a server at the low priority class, and was charged to the key.
    assert len(_batch_requests(demo_backends)) - before == 6
    prompt_tokens = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in lines)
    completion_tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)

    def charged() -> dict | None:
        rows = gw.admin("GET", "/admin/usage", params={"key_id": created["id"]}).json()["data"]
        return rows[0] if rows and rows[0]["requests"] == 7 else None

    row = wait_for(charged, 10, "the ledger to show the 6 batch requests and the direct one")
    assert row["prompt_tokens"] == prompt_tokens + direct.usage.prompt_tokens
    assert row["completion_tokens"] == completion_tokens + direct.usage.completion_tokens

    with pytest.raises(openai.APIStatusError) as refused:
        client.batches.cancel(batch.id)
    assert refused.value.status_code == 409 and refused.value.body["code"] == "batch_not_cancellable"

    listed = client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]
    files = {f.id: f.purpose for f in client.files.list().data}
    assert files == {upload.id: "batch", done.output_file_id: "batch_output"}

    # Offline, the same file through the engine directly: the same format, the same greedy answers.
    source = tmp_path / "input.jsonl"
    source.write_bytes(chat_lines(6))
    target = tmp_path / "output.jsonl"
    run = subprocess.run([sys.executable, "-m", "lmserve.cli", "batch", "run", str(source), "-o", str(target),
                          "--model", "demo"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    offline = jsonl(target.read_bytes())
    assert [line["custom_id"] for line in offline] == [line["custom_id"] for line in lines]
    for mine, theirs in zip(offline, lines):
        assert mine.keys() == theirs.keys() and mine["response"].keys() == theirs["response"].keys()
        body, reference = mine["response"]["body"], theirs["response"]["body"]
        assert body.keys() == reference.keys() and body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == reference["choices"][0]["message"]
        assert body["usage"]["completion_tokens"] == reference["usage"]["completion_tokens"]


def test_restart_mid_batch_resumes_and_runs_each_request_once(demo_backends, gateway_factory, tmp_path: Path) -> None:
    config = gateway_config(tmp_path, [s.url for s in demo_backends], concurrency=1)
    first = gateway_factory(config, name="first")
    key = first.create_key(name="restart")
    client = _client(first.url, key)
    before = len(_batch_requests(demo_backends))
    upload = client.files.create(file=("input.jsonl", chat_lines(16, max_tokens=24, ignore_eos=True)),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    mid = wait_for(lambda: (b := client.batches.retrieve(batch.id)).request_counts.completed >= 2 and b, 120,
                   "two requests to complete")
    first.proc.kill()  # SIGKILL: no drain, no lease release
    assert mid.status == "in_progress" and mid.request_counts.completed < 16, mid

    second = gateway_factory(config, name="second")  # same database
    client = _client(second.url, key)
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b, 180,
                    "the resumed batch to complete")
    assert (done.request_counts.completed, done.request_counts.failed) == (16, 0)
    ids = [line["custom_id"] for line in jsonl(client.files.content(done.output_file_id).content)]
    assert ids == [f"req-{i}" for i in range(16)]
    # At most the one request in flight at the kill ran twice (its result was never recorded).
    assert 16 <= len(_batch_requests(demo_backends)) - before <= 17


def test_offline_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_bytes(chat_lines(2) + b'{"custom_id": "req-0", "method": "POST"}\n')
    run = subprocess.run([sys.executable, "-m", "lmserve.cli", "batch", "run", str(source), "-o",
                          str(tmp_path / "out.jsonl"), "--model", "demo"], capture_output=True, text=True,
                         timeout=120, cwd=REPO_ROOT)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "line 3" in run.stderr and "url" in run.stderr, run.stderr
    assert not (tmp_path / "out.jsonl").exists()

