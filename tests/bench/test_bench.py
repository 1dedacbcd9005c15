"""The load generator against a real server: what it counts is what the server did."""

import json
import os
import pty
import subprocess
import sys
import threading

import pytest

from lmserve.bench.workload import parse_range, random_token_ids, w1
from tests.bench.helpers import bench_json, hand_percentile
from tests.conftest import SERVED_MODEL_NAME


def test_w1_is_the_specified_workload():
    specs = w1()
    assert len(specs) == 128
    assert all(64 <= s.prompt_len <= 512 and 32 <= s.output_len <= 256 for s in specs)
    assert all(100 <= t < 31900 for s in specs for t in s.prompt)
    assert w1() == specs and w1(seed=1) != specs
    assert parse_range("7") == (7, 7) and parse_range("3:9") == (3, 9)


def run_bench(server, tmp_path, *args):
    return bench_json(server.url, tmp_path / "summary.json", *args)


def test_closed_loop_counts_every_token(server, tmp_path):
    summary = run_bench(server, tmp_path, "--num-requests", "24", "--input-len", "5:40", "--output-len", "10:30",
                        "--concurrency", "6", "--seed", "3")
    specs = random_token_ids(24, (5, 40), (10, 30), (5, 500), 3)
    assert summary["num_ok"] == 24 and summary["errors"] == {}
    expected_output = sum(s.output_len for s in specs)
    assert summary["output_throughput"] * summary["duration_s"] == pytest.approx(expected_output)
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


def test_percentiles_in_the_json_are_those_of_the_requests(server, tmp_path):
    summary = run_bench(server, tmp_path, "--num-requests", "16", "--input-len", "5:30", "--output-len", "4:12",
                        "--concurrency", "4", "--seed", "5")
    requests = summary["requests"]
    assert len(requests) == 16 and all(r["ok"] for r in requests)
    assert sum(r["output_tokens"] for r in requests) == sum(s.output_len for s in
                                                             random_token_ids(16, (5, 30), (4, 12), (5, 500), 5))
    ttft = [r["ttft_s"] for r in requests]
    e2e = [r["e2e_s"] for r in requests]
    for q in (50, 90, 95, 99):
        assert summary[f"ttft_p{q}"] == pytest.approx(hand_percentile(ttft, q), abs=2e-6)
        assert summary[f"e2e_p{q}"] == pytest.approx(hand_percentile(e2e, q), abs=2e-6)
    itl = [summary[f"itl_p{q}"] for q in (50, 90, 95, 99)]
    assert itl == sorted(itl) and itl[0] > 0
    # The ITL CDF holds the percentiles 0..100 of the same gaps.
    assert summary["itl_cdf_s"][50] == pytest.approx(summary["itl_p50"], abs=2e-6)
    assert summary["itl_cdf_s"][99] == pytest.approx(summary["itl_p99"], abs=2e-6)
    assert summary["goodput_num_met"] is None and summary["load"]["concurrency"] == 4


def test_goodput_is_counted_from_each_request(server, tmp_path):
    # A TTFT target at a run's median: the requests at or under it in the next run are the ones
    # counted, as found again from that run's per-request records.
    first = run_bench(server, tmp_path, "--num-requests", "12", "--input-len", "8:40", "--output-len", "6",
                      "--concurrency", "3", "--seed", "2", "--slo-ttft-ms", "60000", "--slo-e2e-ms", "60000")
    assert first["goodput_num_met"] == 12 and first["goodput_fraction"] == 1.0
    assert first["goodput_request_throughput"] == pytest.approx(12 / first["duration_s"])
    # Half a microsecond past a whole one: the records, rounded to microseconds, compare with it as
    # the unrounded latencies did.
    target_ms = int(sorted(r["ttft_s"] for r in first["requests"])[5] * 1e6) / 1000 + 0.0005
    again = run_bench(server, tmp_path, "--num-requests", "12", "--input-len", "8:40", "--output-len", "6",
                      "--concurrency", "3", "--seed", "2", "--slo-ttft-ms", f"{target_ms:.4f}")
    met = sum(r["ttft_s"] * 1000 <= target_ms for r in again["requests"])
    assert again["goodput_num_met"] == met and again["goodput_fraction"] == pytest.approx(met / 12)
    assert again["slo_ttft_ms"] == pytest.approx(target_ms) and again["slo_itl_ms"] is None


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_num_requests_is_honoured_with_a_dataset(server, tmp_path):
    dataset = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"The number {i} is", "max_tokens": 3 + i} for i in range(6)])
    fewer = run_bench(server, tmp_path, "--dataset", str(dataset), "--num-requests", "4", "--concurrency", "2")
    assert fewer["num_requests"] == 4 and fewer["num_ok"] == 4
    assert sum(r["output_tokens"] for r in fewer["requests"]) == 3 + 4 + 5 + 6
    more = run_bench(server, tmp_path, "--dataset", str(dataset), "--num-requests", "8", "--concurrency", "2")
    assert more["num_ok"] == 8 and sum(r["output_tokens"] for r in more["requests"]) == sum(range(3, 9)) + 3 + 4
    every = run_bench(server, tmp_path, "--dataset", str(dataset), "--concurrency", "2")
    assert every["num_ok"] == 6


def test_chat_messages_and_sharegpt_datasets(server, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count to {i}"}],
         "max_tokens": 5} for i in range(3)])
    summary = run_bench(server, tmp_path, "--dataset", str(chat), "--concurrency", "3")
    assert summary["num_ok"] == 3 and all(r["output_tokens"] == 5 for r in summary["requests"])
    assert all(r["ttft_s"] is not None for r in summary["requests"])
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "x" * 40}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no question first"}]},
        {"id": "c", "conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "Why?"},
                                      {"from": "gpt", "value": "y" * 400}]},
    ]))
    summary = run_bench(server, tmp_path, "--dataset", str(sharegpt), "--output-len", "2:50", "--concurrency", "2")
    # Two usable conversations: answers of 40 and 400 characters -> 10 tokens, and 100 clipped to 50.
    assert summary["num_requests"] == 2 and [r["output_tokens"] for r in summary["requests"]] == [10, 50]


def read_all(fd: int, into: list[bytes]) -> None:
    """Reads a pty's controller until its other end is closed (EIO)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        into.append(chunk)


def test_json_on_stdout_stays_clean_with_progress_on_a_terminal(server, tmp_path):
    # stderr is a terminal (progress is drawn there), stdout a pipe: stdout must be only the JSON.
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmserve.cli", "bench", "--base-url", server.url + "/v1", "--model",
         SERVED_MODEL_NAME, "--vocab", "5:500", "--num-requests", "12", "--input-len", "8", "--output-len", "8",
         "--concurrency", "2", "--json", "-"],
        stdout=subprocess.PIPE, stderr=terminal, env=env, text=True)
    os.close(terminal)
    seen: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(controller, seen))  # a full pty would block the child
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(timeout=30)
    os.close(controller)
    text = b"".join(seen).decode(errors="replace")
    assert proc.returncode == 0, text
    assert json.loads(stdout)["num_ok"] == 12
    assert "/12" in text and "latency ms" in text  # the bar's count, then the report on stderr
