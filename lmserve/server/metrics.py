"""Prometheus metrics of one model server, named as vLLM names them, under `lmserve:`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmserve.engine.engine import EngineStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(maximum: int) -> list[float]:
    """1-2-5 steps up to `maximum` tokens."""
    buckets, scale = [], 1
    while True:
        for step in (1, 2, 5):
            value = step * scale
            if value > maximum:
                return buckets
            buckets.append(float(value))
        scale *= 10


class _EngineCollector(Collector):
    """Gauges and cumulative counters read from the engine's latest stats at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        for name, doc, value in (
            ("num_requests_running", "Sequences running (holding KV blocks).", s.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("num_requests_swapped", "Sequences swapped out to the CPU pool.", s.num_swapped),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage),
            ("cpu_kv_cache_usage_perc", "Fraction of the CPU swap pool in use.", s.cpu_kv_cache_usage),
            ("num_queued_requests", "Requests not started yet (bounded by max_queued_requests).",
             s.num_queued_requests),
            ("num_queued_tokens", "Prompt tokens of requests not started yet.", s.num_queued_tokens),
        ):
            yield self._family(GaugeMetricFamily, name, doc, value)
        for name, doc, value in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("num_preemptions", "Sequences preempted for lack of KV blocks (both modes).", s.num_preemptions),
            ("request_timeouts", "Sequences ended by their queue timeout or deadline.", s.num_timeouts),
            ("requests_rejected", "Requests refused by admission control (429).", s.num_rejected),
            ("blocks_swapped_out", "KV blocks copied to the CPU pool.", s.num_blocks_swapped_out),
            ("blocks_swapped_in", "KV blocks copied back from the CPU pool.", s.num_blocks_swapped_in),
        ):
            yield self._family(CounterMetricFamily, name, doc, value)
        by_mode = CounterMetricFamily("lmserve:preemptions", "Preemptions by mode.", labels=["model_name", "mode"])
        by_mode.add_metric([self.model_name, "recompute"], s.num_recompute_preemptions)
        by_mode.add_metric([self.model_name, "swap"], s.num_swap_preemptions)
        yield by_mode
        yield from self._tenant_families(s)

    def _family(self, kind: type, name: str, doc: str, value: float) -> Metric:
        family = kind(f"lmserve:{name}", doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family

    def _tenant_families(self, s: EngineStats) -> Iterator[Metric]:
        """Per tenant label: the first tenants seen each get one, the rest share "other"."""
        labels = ["model_name", "tenant"]
        gauges = {
            "tenant_requests_running": "Sequences running, by tenant.",
            "tenant_requests_waiting": "Sequences waiting, by tenant.",
        }
        counters = {
            "tenant_requests_started": "Sequences started, by tenant.",
            "tenant_queue_time_seconds": "Seconds waited before starting, summed, by tenant.",
            "tenant_prompt_tokens": "Prompt tokens of started sequences, by tenant.",
            "tenant_generation_tokens": "Tokens generated, by tenant.",
        }
        families = {name: GaugeMetricFamily(f"lmserve:{name}", doc, labels=labels) for name, doc in gauges.items()}
        families.update({name: CounterMetricFamily(f"lmserve:{name}", doc, labels=labels)
                         for name, doc in counters.items()})
        for tenant, t in s.tenants.items():
            key = [self.model_name, tenant]
            families["tenant_requests_running"].add_metric(key, t.num_running)
            families["tenant_requests_waiting"].add_metric(key, t.num_waiting)
            families["tenant_requests_started"].add_metric(key, t.num_started)
            families["tenant_queue_time_seconds"].add_metric(key, t.queue_time_seconds_sum)
            families["tenant_prompt_tokens"].add_metric(key, t.num_prompt_tokens)
            families["tenant_generation_tokens"].add_metric(key, t.num_generation_tokens)
        yield from families.values()


class _GPUCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], device: str) -> None:
        self.stats = stats
        self.index = device.partition(":")[2] or "0"

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("lmserve:gpu_memory_used_bytes", "GPU memory held by PyTorch.", labels=["device"])
        gauge.add_metric([self.index], self.stats().device_memory_allocated)
        yield gauge


def memory_limit_bytes() -> float:
    """The cgroup (v2, then v1) memory limit of this container; the machine's memory when unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 62:  # v1 reports "no limit" as a huge number
            return float(text)
    return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class ServerMetrics:
    """Owns a registry (no global state); request counters are updated as requests end."""

    def __init__(self, model_name: str, max_model_len: int, stats: Callable[[], EngineStats], device: str,
                 engine_pid: int | None = None, max_num_seqs: int = 0,
                 engine_alive: Callable[[], bool] | None = None) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("lmserve:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("lmserve:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter(
            "lmserve:request_success", "Requests whose every choice finished (stop, length), by reason.",
            labels + ["finished_reason"], registry=r
        )
        self.request_failure = Counter(
            "lmserve:request_failure",
            "Generation requests that did not finish: refused, failed, timed out or disconnected, by HTTP "
            "status (499: client left; a stream's error event counts with the status it stands for) and "
            "reason (the error code).", labels + ["status", "reason"], registry=r
        )
        self.ttft = Histogram("lmserve:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lmserve:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lmserve:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("lmserve:request_queue_time_seconds", "Time waiting before first scheduled.",
                                    labels, buckets=LATENCY_BUCKETS, registry=r)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = Histogram("lmserve:request_prompt_tokens", "Prompt tokens per request.",
                                               labels, buckets=tokens, registry=r)
        self.request_generation_tokens = Histogram("lmserve:request_generation_tokens",
                                                   "Generated tokens per request.", labels, buckets=tokens, registry=r)
        self.iteration_tokens = Histogram("lmserve:iteration_tokens_total", "Tokens computed per engine step.",
                                          labels, buckets=token_buckets(1 << 16), registry=r)
        r.register(_EngineCollector(stats, model_name))
        # For alerts: utilization (running / max_num_seqs), engine death, memory against the limit.
        Gauge("lmserve:max_num_seqs", "Most sequences the engine runs at once.", labels,
              registry=r).labels(model_name).set(max_num_seqs)
        alive = Gauge("lmserve:engine_alive", "1 while the engine (process or thread) runs.", labels, registry=r)
        alive.labels(model_name).set_function(lambda: 1.0 if engine_alive is None or engine_alive() else 0.0)
        Gauge("lmserve:memory_limit_bytes", "Memory limit of this container (cgroup), else the machine's.",
              registry=r).set_function(memory_limit_bytes)
        ProcessCollector(registry=r)
        if engine_pid is not None:  # the engine's own process: process_* under lmserve_engine_
            ProcessCollector(namespace="lmserve_engine", pid=lambda: engine_pid, registry=r)
        if device.startswith("cuda"):
            r.register(_GPUCollector(stats, device))
        self.model_name = model_name

    def observe_step(self, num_tokens: int) -> None:
        self.iteration_tokens.labels(self.model_name).observe(num_tokens)

    def observe_request(
        self,
        prompt_tokens: int,
        generation_tokens: int,
        finish_reason: str,
        e2e_seconds: float,
        ttft_seconds: float | None,
        queue_seconds: float | None,
        inter_token_seconds: list[float],
    ) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generation_tokens)
        self.request_success.labels(m, finish_reason).inc()
        self.e2e.labels(m).observe(e2e_seconds)
        self.request_prompt_tokens.labels(m).observe(prompt_tokens)
        self.request_generation_tokens.labels(m).observe(generation_tokens)
        if ttft_seconds is not None:
            self.ttft.labels(m).observe(ttft_seconds)
        if queue_seconds is not None:
            self.queue_time.labels(m).observe(queue_seconds)
        itl = self.itl.labels(m)
        for gap in inter_token_seconds:
            itl.observe(gap)

    def observe_failure(self, status: int, reason: str) -> None:
        self.request_failure.labels(self.model_name, str(status), reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""Routes whose error responses count in `request_failure`."""


class ResponseWatch:
    """One response's status and, when it is an error, the code of its OpenAI error body (read from
    the first 4 KiB: error bodies are small and sent in one message)."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body = b""

    def see(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif self.status is not None and self.status >= 400 and len(self.body) < 4096:
            self.body += message.get("body", b"")

    def reason(self) -> str:
        try:
            error = orjson.loads(self.body).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return "error"
        return str(error.get("code") or error.get("type") or "error") if isinstance(error, dict) else "error"
