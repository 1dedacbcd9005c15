"""The load generator against a real server: what it counts is what the server did."""

import json
import subprocess
import sys

from lmserve.bench.workload import parse_range, random_token_ids, w1
from tests.conftest import SERVED_MODEL_NAME


def test_w1_is_the_specified_workload():
    specs = w1()
    assert len(specs) == 128
    assert all(64 <= s.prompt_len <= 512 and 32 <= s.output_len <= 256 for s in specs)
    assert all(100 <= t < 31900 for s in specs for t in s.prompt)
    assert w1() == specs and w1(seed=1) != specs
    assert parse_range("7") == (7, 7) and parse_range("3:9") == (3, 9)


def run_bench(server, tmp_path, *args):
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lmserve.cli", "bench", "--base-url", server.url + "/v1", "--model", SERVED_MODEL_NAME,
         "--vocab", "5:500", "--json", str(out), *args],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TTFT p50 / p99" in proc.stdout
    return json.loads(out.read_text())


def test_closed_loop_counts_every_token(server, tmp_path):
    summary = run_bench(server, tmp_path, "--num-requests", "24", "--input-len", "5:40", "--output-len", "10:30",
                        "--concurrency", "6", "--seed", "3")
    specs = random_token_ids(24, (5, 40), (10, 30), (5, 500), 3)
    assert summary["num_ok"] == 24 and summary["errors"] == {}
    expected_output = sum(s.output_len for s in specs)
    assert summary["output_throughput"] * summary["duration_s"] == __import__("pytest").approx(expected_output)
    assert summary["ttft_p50"] is not None and summary["ttft_p50"] <= summary["e2e_p50"]


def test_poisson_rate_spreads_arrivals(server, tmp_path):
    summary = run_bench(server, tmp_path, "--num-requests", "12", "--input-len", "8", "--output-len", "4",
                        "--rate", "20", "--seed", "1")
    assert summary["num_ok"] == 12
    assert summary["duration_s"] >= 0.2  # 11 exponential gaps at 20/s average 0.55 s; far above zero


def test_errors_are_counted_not_hidden(server, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lmserve.cli", "bench", "--base-url", server.url + "/v1", "--model", "no-such-model",
         "--num-requests", "3", "--input-len", "4", "--output-len", "2", "--vocab", "5:50"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and "0/3 ok" in proc.stdout and "404" in proc.stdout
