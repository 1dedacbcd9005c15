"""/metrics in Prometheus text format with vLLM's names under lmserve:."""

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
