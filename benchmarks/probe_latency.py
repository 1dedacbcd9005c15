"""How fast a server answers `GET /health` and `GET /ready`, idle and under full streaming load.

Starts `lmserve serve` (the built-in demo model unless --model), probes it idle, then runs
`lmserve bench` (streaming, in its own process so the probes do not share its event loop) and
probes again while the server has requests running. Prints p50 / p99 / max per endpoint and phase.

    PYTHONPATH=$PWD python -m benchmarks.probe_latency                      # small default size
    PYTHONPATH=$PWD python -m benchmarks.probe_latency --concurrency 128 --num-requests 512
    PYTHONPATH=$PWD python -m benchmarks.probe_latency --url http://127.0.0.1:8100 --model lmserve-demo

A probe that does not answer within --timeout counts as a timeout (and as --timeout in the figures).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.servers import free_port, stop_group, wait_http

PATHS = ("/health", "/ready")


def probe_round(client: httpx.Client, url: str, timeout: float) -> dict[str, float | None]:
    """One GET of each probe path; the seconds each took, or None for a timeout or error."""
    out: dict[str, float | None] = {}
    for path in PATHS:
        started = time.perf_counter()
        try:
            client.get(url + path, timeout=timeout)
            out[path] = time.perf_counter() - started
        except httpx.HTTPError:
            out[path] = None
    return out


def summarize(samples: list[float | None], timeout: float) -> str:
    if not samples:
        return "no samples"
    failed = sum(1 for s in samples if s is None)
    values = sorted(s if s is not None else timeout for s in samples)
    p99 = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
    return (f"n={len(values):4d}  p50={1000 * statistics.median(values):8.1f} ms  p99={1000 * p99:8.1f} ms"
            f"  max={1000 * values[-1]:8.1f} ms  timeouts/errors={failed}")


def in_flight(client: httpx.Client, url: str) -> int:
    try:
        return int(client.get(url + "/v1/status", timeout=5).json().get("running", 0))
    except (httpx.HTTPError, ValueError):
        return 0


def probe_idle(client: httpx.Client, url: str, args: argparse.Namespace) -> dict[str, list[float | None]]:
    samples: dict[str, list[float | None]] = {p: [] for p in PATHS}
    for _ in range(args.probes):
        for path, took in probe_round(client, url, args.timeout).items():
            samples[path].append(took)
        time.sleep(args.interval)
    return samples


def probe_loaded(client: httpx.Client, url: str, args: argparse.Namespace) -> dict[str, list[float | None]]:
    """Runs the bench in a child process and probes while the server has requests running."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "lmserve.cli", "bench", "--base-url", url + "/v1", "--model", args.model_name,
         "--num-requests", str(args.num_requests), "--concurrency", str(args.concurrency),
         "--input-len", args.input_len, "--output-len", args.output_len, "--vocab", "100:4000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    samples: dict[str, list[float | None]] = {p: [] for p in PATHS}
    try:
        deadline = time.monotonic() + 120
        while in_flight(client, url) == 0 and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        while bench.poll() is None and len(samples["/health"]) < args.max_loaded_probes:
            for path, took in probe_round(client, url, args.timeout).items():
                samples[path].append(took)
            time.sleep(args.interval)
    finally:
        if bench.poll() is None:
            stop_group(bench)
        output = bench.communicate()[0]
    print("bench:", *[line for line in output.splitlines() if line.strip()][-12:], sep="\n  ")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="An already running server (default: start one).")
    parser.add_argument("--model", default="demo", help="What `lmserve serve` loads when starting one.")
    parser.add_argument("--model-name", default="lmserve-demo", help="Model name sent by the bench.")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--input-len", default="100:300")
    parser.add_argument("--output-len", default="50:200")  # within the demo model's 512
    parser.add_argument("--probes", type=int, default=50, help="Idle probe rounds.")
    parser.add_argument("--max-loaded-probes", type=int, default=3000)
    parser.add_argument("--interval", type=float, default=0.1, help="Seconds between probe rounds.")
    parser.add_argument("--timeout", type=float, default=10.0, help="Seconds before a probe counts as timed out.")
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path("probe_latency_server.log")
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "lmserve.cli", "serve", args.model, "--port", str(port),
                 "--served-model-name", args.model_name],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"server on {url}, log in {log}")
    try:
        wait_http(url + "/ready", timeout=300, proc=server)
        while httpx.get(url + "/ready", timeout=5).status_code != 200:
            time.sleep(0.2)
        with httpx.Client() as client:  # one kept-alive connection, as a gateway or kubelet prober uses
            idle = probe_idle(client, url, args)
            loaded = probe_loaded(client, url, args)
    finally:
        if server is not None:
            stop_group(server)
    print(f"\nprobe latency ({args.concurrency} streams, {args.num_requests} requests, "
          f"input {args.input_len}, output {args.output_len})")
    for phase, samples in (("idle", idle), ("load", loaded)):
        for path in PATHS:
            print(f"  {phase:4s} {path:8s} {summarize(samples[path], args.timeout)}")


if __name__ == "__main__":
    main()
