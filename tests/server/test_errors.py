"""Every failure answers with the right status and OpenAI's error body."""

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL_NAME


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    "payload, param, fragment",
    [
        ({"model": MODEL_NAME, "prompt": "x", "max_tokens": "many"}, "max_tokens", "integer"),
        ({"model": MODEL_NAME, "prompt": "x", "temperature": -1}, None, "temperature must be >= 0"),
        ({"model": MODEL_NAME, "prompt": "x", "top_p": 1.5}, None, "top_p must be in (0, 1]"),
        ({"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}, None, "max_tokens must be >= 1"),
        ({"model": MODEL_NAME, "prompt": "x", "max_tokenz": 3}, "max_tokenz", "Unrecognized request argument"),
        ({"model": MODEL_NAME, "prompt": ""}, "prompt", "must not be empty"),
        ({"model": MODEL_NAME, "prompt": []}, "prompt", "must not be empty"),
        ({"model": MODEL_NAME, "prompt": [1, 99999]}, None, "outside the vocabulary"),
        ({"model": MODEL_NAME, "prompt": "x", "max_tokens": 2000}, "max_tokens", "maximum context length is 1024"),
        ({"model": MODEL_NAME, "prompt": "x", "logit_bias": {"five": 1}}, "logit_bias", "token ids"),
        ({"model": MODEL_NAME, "prompt": "x", "logit_bias": {"5": 101}}, None, "[-100, 100]"),
        ({"model": MODEL_NAME, "prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "outside the vocabulary"),
        ({"model": MODEL_NAME, "prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, None, "at most 1024"),
        ({"prompt": "x"}, "model", "Missing required parameter"),
    ],
)
def test_bad_completion_requests_get_400(server, payload, param, fragment):
    error = error_of(httpx.post(server.url + "/v1/completions", json=payload), 400)
    assert error["type"] == "invalid_request_error" and fragment in error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"model": MODEL_NAME, "messages": []}, "messages"),
        ({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
         "tools.0.function"),
        ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
         "tool_choice is only allowed when tools are specified"),
        ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
         "send tools and tool_choice"),
        ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_schema"}}, "needs a json_schema object"),
        ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
         "top_logprobs needs logprobs"),
    ],
)
def test_bad_chat_requests_get_400(server, payload, fragment):
    assert fragment in error_of(httpx.post(server.url + "/v1/chat/completions", json=payload), 400)["message"]


def test_invalid_json_and_wrong_content(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_json"


def test_unknown_model_is_404(server):
    error = error_of(httpx.post(server.url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_unknown_route_and_method(server):
    assert error_of(httpx.get(server.url + "/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(httpx.get(server.url + "/v1/completions"), 405)["code"] == "method_not_allowed"


def test_body_too_large_is_413(server):
    big = {"model": MODEL_NAME, "prompt": "x" * (9 * 2**20)}
    assert error_of(httpx.post(server.url + "/v1/completions", json=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 2**20
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"


def test_api_key(start_server):
    server = start_server("--api-key", "s3cret")
    payload = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 1}
    assert error_of(httpx.post(server.url + "/v1/completions", json=payload), 401)["code"] == "invalid_api_key"
    wrong = httpx.post(server.url + "/v1/completions", json=payload, headers={"Authorization": "Bearer nope"})
    assert error_of(wrong, 401)["code"] == "invalid_api_key"
    ok = httpx.post(server.url + "/v1/completions", json=payload, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_token_ids_outside_the_vocabulary_with_echo_are_400_not_500(server):
    payload = {"model": MODEL_NAME, "prompt": [-1], "echo": True}
    assert "outside the vocabulary" in error_of(httpx.post(server.url + "/v1/completions", json=payload), 400)["message"]


def test_engine_overload_is_429_with_retry_after(start_server):
    server = start_server("--max-num-seqs", "1", "--max-queued-requests", "1")
    # As long as the tiny model allows: the refused request must arrive before the running one ends
    # and the queued one takes its place.
    long = {"model": MODEL_NAME, "prompt": "busy", "max_tokens": 1000, "ignore_eos": True}
    results = []
    workers = [threading.Thread(target=lambda: results.append(httpx.post(server.url + "/v1/completions", json=long,
                                                                           timeout=60).status_code))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    # Both must be in: one running and one waiting. "waiting == 1" alone is also true for a moment
    # when the first request has arrived and not yet been scheduled, before the second arrives.
    deadline = time.monotonic() + 10
    while (status := httpx.get(server.url + "/v1/status").json()).get("running") != 1 or status.get("waiting") != 1:
        assert time.monotonic() < deadline, f"the two requests never were one running, one queued: {status}"
    refused = httpx.post(server.url + "/v1/completions", json={**long, "max_tokens": 2})
    error = error_of(refused, 429)
    assert error["type"] == "rate_limit_error" and error["code"] == "engine_overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    for worker in workers:
        worker.join(60)
    assert results == [200, 200]  # nothing already admitted was lost


def failures(server, status: str, reason: str) -> float:
    """lmserve:request_failure_total{status, reason} from the live /metrics (0 when absent)."""
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            if s.name == "lmserve:request_failure_total" and (s.labels["status"], s.labels["reason"]) == (status, reason):
                return s.value
    return 0.0


def test_queue_timeout_is_an_error_not_a_finished_answer(start_server):
    server = start_server("--max-num-seqs", "1", "--queue-timeout", "0.3")
    long = {"model": MODEL_NAME, "prompt": "busy", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    ended: list[float] = []

    def hold_the_only_slot() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=60) as r:
            for _ in r.iter_lines():
                pass
        ended.append(time.monotonic())

    worker = threading.Thread(target=hold_the_only_slot)
    worker.start()
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/v1/status").json().get("running") != 1:
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.02)
    answers: dict = {}

    def whole() -> None:
        queued = {"model": MODEL_NAME, "prompt": "late", "max_tokens": 5}
        answers["whole"] = httpx.post(server.url + "/v1/completions", json=queued, timeout=30)

    def streamed() -> None:
        queued = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "late"}], "max_tokens": 5,
                  "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=queued, timeout=30) as r:
            answers["stream"] = (r.status_code, [line for line in r.iter_lines() if line])

    late = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for thread in late:  # both at once: both must time out while the long request holds the slot
        thread.start()
    for thread in late:
        thread.join(30)
    answered = time.monotonic()
    error = error_of(answers["whole"], 503)
    assert (error["type"], error["code"]) == ("service_unavailable", "queue_timeout")
    assert int(answers["whole"].headers["retry-after"]) >= 1
    status, lines = answers["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["error"]["code"] == "queue_timeout"
    assert all(c.get("finish_reason") != "timeout" for e in events[:-1] for c in e["choices"])
    assert failures(server, "503", "queue_timeout") == 2
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    assert all("timeout" not in s.labels["finished_reason"] for s in families["lmserve:request_success"].samples)
    worker.join(120)
    assert ended, "the long request did not end"
    assert ended[0] > answered, "the long request ended before the queued ones timed out"
