"""/metrics in Prometheus text format with vLLM's names under lmserve:."""

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL_NAME

EXPECTED = {
    "lmserve:num_requests_running": "gauge",
    "lmserve:num_requests_waiting": "gauge",
    "lmserve:num_requests_swapped": "gauge",
    "lmserve:kv_cache_usage_perc": "gauge",
    "lmserve:prefix_cache_queries": "counter",
    "lmserve:prefix_cache_hits": "counter",
    "lmserve:prompt_tokens": "counter",
    "lmserve:generation_tokens": "counter",
    "lmserve:num_preemptions": "counter",
    "lmserve:request_success": "counter",
    "lmserve:request_failure": "counter",
    "lmserve:time_to_first_token_seconds": "histogram",
    "lmserve:inter_token_latency_seconds": "histogram",
    "lmserve:e2e_request_latency_seconds": "histogram",
    "lmserve:request_queue_time_seconds": "histogram",
    "lmserve:request_prompt_tokens": "histogram",
    "lmserve:request_generation_tokens": "histogram",
    "lmserve:iteration_tokens_total": "histogram",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "lmserve_engine_process_cpu_seconds": "counter",
    "lmserve_engine_process_resident_memory_bytes": "gauge",
}


def scrape(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families, name, suffix="", **labels):
    for s in families[name].samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_names_types_and_counts(server):
    before = scrape(server)
    for name, kind in EXPECTED.items():
        assert name in before and before[name].type == kind, name
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL_NAME, "prompt": "Count me", "max_tokens": 7, "ignore_eos": True})
    usage = r.json()["usage"]
    after = scrape(server)
    gen = sample(after, "lmserve:generation_tokens", "_total") - (sample(before, "lmserve:generation_tokens", "_total") or 0)
    prompt = sample(after, "lmserve:prompt_tokens", "_total") - (sample(before, "lmserve:prompt_tokens", "_total") or 0)
    assert (gen, prompt) == (7, usage["prompt_tokens"])
    assert sample(after, "lmserve:request_success", "_total", finished_reason="length") >= 1
    assert sample(after, "lmserve:time_to_first_token_seconds", "_count", model_name=MODEL_NAME) >= 1
    assert sample(after, "lmserve:inter_token_latency_seconds", "_count") >= 6
    assert sample(after, "lmserve:iteration_tokens_total", "_sum") > sample(before, "lmserve:iteration_tokens_total", "_sum")
    assert sample(after, "lmserve:num_requests_running", "") == 0
    # The engine process (the server's child) is scraped too.
    engine_rss = sample(after, "lmserve_engine_process_resident_memory_bytes")
    assert engine_rss > 0 and sample(after, "lmserve_engine_process_cpu_seconds", "_total") > 0


def test_requests_are_counted_by_outcome(server):
    """Errors count in request_failure{status, reason}; only finished answers in request_success."""
    def counts() -> tuple[dict, float]:
        families = scrape(server)
        failed = {(s.labels["status"], s.labels["reason"]): s.value
                  for s in families["lmserve:request_failure"].samples if s.name.endswith("_total")}
        succeeded = sum(s.value for s in families["lmserve:request_success"].samples if s.name.endswith("_total"))
        return failed, succeeded

    before, succeeded_before = counts()
    ok = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=ok).status_code == 200
    assert httpx.post(server.url + "/v1/completions", json={**ok, "max_tokens": 5000}).status_code == 400
    assert httpx.post(server.url + "/v1/completions", json={**ok, "max_tokenz": 1}).status_code == 400
    assert httpx.post(server.url + "/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
    after, succeeded_after = counts()
    grown = {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}
    assert grown == {("400", "context_length_exceeded"): 1, ("400", "invalid_request_error"): 1,
                     ("404", "model_not_found"): 1}
    assert succeeded_after - succeeded_before == 1

    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={**ok, "max_tokens": 1000, "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())  # started; then the client leaves
    deadline = time.monotonic() + 10
    while counts()[0].get(("499", "client_disconnected"), 0) == before.get(("499", "client_disconnected"), 0):
        assert time.monotonic() < deadline, "a client that left was not counted"
        time.sleep(0.05)
    assert counts()[1] == succeeded_after
