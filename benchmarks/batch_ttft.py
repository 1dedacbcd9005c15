"""Batch jobs against interactive latency (issue 17): TTFT p99 of interactive streams with and without a batch.

    .venv/bin/python benchmarks/batch_ttft.py            # full run, writes the `batch_ttft` section
    .venv/bin/python benchmarks/batch_ttft.py --quick    # 20 s phases, prints only

One `lmserve serve demo` (priority scheduling, the gateway's key so that it honours the priority
header) behind one `lmserve gateway` (SQLite in a temporary directory, `batch.concurrency` as given).
Interactive load: streamed chat requests with Poisson arrivals at `--rate` per second (numpy
default_rng(0)), 24 output tokens each, greedy; TTFT is the time to the first content event, seen
by the client. Phase 1 runs that load alone; phase 2 runs the same arrival trace while a batch of
`--batch-requests` chat requests (64 output tokens each) runs through `/v1/batches`. The batch's
progress during phase 2 is the capacity it used.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.results import write_section
from benchmarks.servers import free_port, stop_group, wait_http

ADMIN, BACKEND_KEY = "bench-admin", "bench-backend"


def start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "lmserve.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT, start_new_session=True)


async def one_stream(client: httpx.AsyncClient, key: str, index: int) -> float | None:
    body = {"model": "demo", "messages": [{"role": "user", "content": f"Question {index}: what is love?"}],
            "max_tokens": 24, "temperature": 0, "stream": True}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            return None
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - started
    return None


async def interactive(url: str, key: str, rate: float, seconds: float) -> list[float]:
    gaps = np.random.default_rng(0).exponential(1 / rate, size=int(rate * seconds * 2))
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < seconds]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        origin = time.perf_counter()

        async def at(offset: float, index: int) -> float | None:
            await asyncio.sleep(max(0.0, origin + offset - time.perf_counter()))
            return await one_stream(client, key, index)

        results = await asyncio.gather(*(at(float(t), i) for i, t in enumerate(arrivals)))
    return [r for r in results if r is not None]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def create_batch(url: str, key: str, count: int) -> str:
    lines = b"".join(orjson.dumps({
        "custom_id": f"b-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "demo", "messages": [{"role": "user", "content": f"Tell me story {i}."}],
                 "max_tokens": 64, "temperature": 0, "ignore_eos": True}}) + b"\n" for i in range(count))
    auth = {"authorization": f"Bearer {key}"}
    upload = httpx.post(url + "/v1/files", headers=auth, data={"purpose": "batch"},
                        files={"file": ("batch.jsonl", lines)}, timeout=60).json()
    batch = httpx.post(url + "/v1/batches", headers=auth, timeout=60, json={
        "input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()
    return batch["id"]


def batch_counts(url: str, key: str, batch_id: str) -> dict:
    return httpx.get(f"{url}/v1/batches/{batch_id}", headers={"authorization": f"Bearer {key}"},
                     timeout=30).json()["request_counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=2.0, help="interactive arrivals per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--batch-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4, help="the gateway's batch.concurrency")
    parser.add_argument("--quick", action="store_true", help="20 s phases, print only")
    args = parser.parse_args()
    seconds = 20.0 if args.quick else args.seconds
    tmp = Path(tempfile.mkdtemp(prefix="lmserve-batch-ttft-"))
    server_port, gateway_port = free_port(), free_port()
    server = start(["serve", "demo", "--port", str(server_port), "--served-model-name", "demo", "--api-key",
                    BACKEND_KEY, "--scheduling-policy", "priority"], tmp / "server.log")
    config = {"port": gateway_port, "database_url": f"sqlite:///{tmp / 'gateway.db'}", "admin_key": ADMIN,
              "access_log": False, "batch": {"concurrency": args.concurrency},
              "models": [{"name": "demo", "backends": [{"url": f"http://127.0.0.1:{server_port}",
                                                        "api_key": BACKEND_KEY}]}]}
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = start(["gateway", "--config", str(tmp / "gateway.yaml")], tmp / "gateway.log")
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        wait_http(f"http://127.0.0.1:{server_port}/ready", proc=server)
        wait_http(url + "/health", proc=gateway)
        key = httpx.post(url + "/admin/keys", json={"name": "bench"}, timeout=30,
                         headers={"authorization": f"Bearer {ADMIN}"}).json()["key"]
        asyncio.run(interactive(url, key, args.rate, 5.0))  # warm-up
        alone = asyncio.run(interactive(url, key, args.rate, seconds))
        batch_id = create_batch(url, key, args.batch_requests)
        before = batch_counts(url, key, batch_id)
        with_batch = asyncio.run(interactive(url, key, args.rate, seconds))
        after = batch_counts(url, key, batch_id)
    finally:
        stop_group(gateway)
        stop_group(server)
    done = after["completed"] + after["failed"] - before["completed"] - before["failed"]
    p99_alone, p99_batch = percentile(alone, 99), percentile(with_batch, 99)
    rows = [
        "| phase | streams | TTFT p50 (ms) | TTFT p99 (ms) | batch requests done |",
        "|---|---|---|---|---|",
        f"| interactive alone | {len(alone)} | {percentile(alone, 50) * 1000:.1f} | {p99_alone * 1000:.1f} | - |",
        f"| with a batch (concurrency {args.concurrency}) | {len(with_batch)} | "
        f"{percentile(with_batch, 50) * 1000:.1f} | {p99_batch * 1000:.1f} | {done} in {seconds:.0f} s |",
    ]
    body = "\n".join([f"`.venv/bin/python benchmarks/batch_ttft.py --rate {args.rate} --seconds {seconds:.0f} "
                      f"--concurrency {args.concurrency}`", "", *rows, "",
                      f"TTFT p99 with the batch / alone: {p99_batch / p99_alone:.2f}x."])
    print(body)
    if not args.quick:
        write_section("batch_ttft", body)


if __name__ == "__main__":
    main()
