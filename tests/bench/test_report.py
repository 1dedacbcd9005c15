"""Percentiles and goodput: against hand-computed figures, and against a slow upstream whose
latencies are known from below."""

import pytest

from lmserve.bench.client import RequestResult
from lmserve.bench.report import Slo, render, summarize
from lmserve.bench.runner import RunResult
from tests.bench.helpers import bench_json, hand_percentile
from tests.gateway.conftest import FakeBackendProc
from tests.services import free_port, python_module, start_process


def ok(ttft: float, gaps: list[float], e2e: float) -> RequestResult:
    return RequestResult(True, 200, prompt_tokens=4, output_tokens=len(gaps) + 1, ttft=ttft, latency=e2e,
                         inter_token=gaps)


def test_percentiles_of_a_known_list():
    # TTFT 10, 20, ..., 100 ms. Linear interpolation at rank q/100 * 9: p50 -> rank 4.5 -> 55 ms;
    # p90 -> 8.1 -> 91; p95 -> 8.55 -> 95.5; p99 -> 8.91 -> 99.1.
    results = [ok(i / 100, [0.001 * i], i / 10) for i in range(1, 11)]
    summary = summarize(RunResult(results, duration=4.0))
    assert [summary.ttft_p50, summary.ttft_p90, summary.ttft_p95, summary.ttft_p99] == \
        pytest.approx([0.055, 0.091, 0.0955, 0.0991])
    assert [summary.e2e_p50, summary.e2e_p90, summary.e2e_p95, summary.e2e_p99] == \
        pytest.approx([0.55, 0.91, 0.955, 0.991])
    itl = [0.001 * i for i in range(1, 11)]
    assert summary.itl_p95 == pytest.approx(hand_percentile(itl, 95))
    assert summary.itl_p95 == pytest.approx(0.00955)
    assert summary.goodput_num_met is None and "goodput" not in render(summary)
    table = render(summary).splitlines()
    assert table[-4].split() == ["latency", "ms", "p50", "p90", "p95", "p99"]
    assert table[-3].split() == ["TTFT", "55.0", "91.0", "95.5", "99.1"]


def test_goodput_of_known_latencies():
    results = [
        ok(0.05, [0.01, 0.01], 0.5),   # meets everything
        ok(0.10, [0.01, 0.09], 0.6),   # mean gap 50 ms: misses ITL 30 ms
        ok(0.20, [0.02, 0.02], 0.7),   # misses TTFT 150 ms
        ok(0.05, [], 2.0),             # no gaps (meets ITL), misses E2E 1 s
        ok(0.05, [0.0, 0.06], 0.5),    # mean gap exactly 30 ms: meets ITL although one gap is 60 ms
        RequestResult(False, 500, error="boom"),
    ]
    run = RunResult(results, duration=2.0)
    every = summarize(run, Slo(ttft_s=0.15, itl_s=0.03, e2e_s=1.0))
    assert (every.goodput_num_met, every.goodput_fraction, every.goodput_request_throughput) == (2, 2 / 6, 1.0)
    assert (every.slo_ttft_ms, every.slo_itl_ms, every.slo_e2e_ms) == pytest.approx((150, 30, 1000))
    assert summarize(run, Slo(ttft_s=0.15)).goodput_num_met == 4
    assert summarize(run, Slo(itl_s=0.03)).goodput_num_met == 4
    assert summarize(run, Slo(e2e_s=1.0)).goodput_num_met == 4
    assert "2/6 (33.3%) met TTFT <= 150 ms, ITL <= 30 ms, E2E <= 1000 ms" in render(every)
    with pytest.raises(ValueError, match="--slo-itl-ms must be > 0"):
        Slo(itl_s=0)


@pytest.fixture(scope="module")
def slow_upstream(tmp_path_factory):
    """The fault-injecting fake: 300 ms before the first chunk, 60 ms between its five chunks."""
    port = free_port()
    proc = start_process(python_module("tests.gateway.fake_backend", "--port", str(port), "--name", "slow"),
                         port, tmp_path_factory.mktemp("slow") / "backend.log")
    backend = FakeBackendProc("slow", proc)
    backend.control(first_chunk_delay=0.3, chunk_delay=0.06, content="Hello from the fake", chunk_chars=4)
    yield backend
    proc.stop()


@pytest.mark.parametrize("slo, num_met", [
    (("--slo-ttft-ms", "200"), 0),                              # every TTFT is >= 300 ms
    (("--slo-ttft-ms", "60000", "--slo-itl-ms", "40"), 0),      # every gap is >= 60 ms
    (("--slo-e2e-ms", "400"), 0),                               # every request takes >= 300 + 4 x 60 ms
    (("--slo-ttft-ms", "60000", "--slo-itl-ms", "60000", "--slo-e2e-ms", "60000"), 6),
])
def test_goodput_against_a_slow_upstream(slow_upstream, tmp_path, slo, num_met):
    summary = bench_json(slow_upstream.url, tmp_path / "out.json", "--num-requests", "6", "--concurrency", "6",
                         "--input-len", "4", "--output-len", "5", *slo)
    assert summary["num_ok"] == 6 and all(r["ttft_s"] >= 0.3 for r in summary["requests"])
    assert summary["goodput_num_met"] == num_met
    assert summary["goodput_fraction"] == num_met / 6
    assert summary["goodput_request_throughput"] == pytest.approx(num_met / summary["duration_s"])
