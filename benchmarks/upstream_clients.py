"""Why the gateway has its own upstream client: aiohttp vs httpx vs lmserve's pooled httptools client.

    python benchmarks/upstream_clients.py --url http://127.0.0.1:9000 [--seconds 5]

Each client sends the same non-streamed POST with 64 requests in flight over keep-alive connections
and reads the whole response; the figure is requests/s of one process on uvloop (the gateway's
set-up), so a higher number means less CPU per proxied request. gateway_overhead.py runs this
pinned to the gateway's core with the mock upstream on the other one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmserve.gateway.upstream import UpstreamPool

BODY = b'{"model":"mock","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'
CONCURRENCY = 64


async def _drive(one: Callable[[], Awaitable[None]], seconds: float) -> float:
    """Completed requests per second over `seconds` with CONCURRENCY requests in flight."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - start)


async def bench_lmserve(url: str, seconds: float) -> float:
    pool = UpstreamPool()
    headers = [(b"content-type", b"application/json")]

    async def one() -> None:
        response = await pool.request(url, b"POST", b"/v1/chat/completions", headers, BODY, 5, 30)
        await response.read()
        response.release()

    rate = await _drive(one, seconds)
    pool.close()
    return rate


async def bench_aiohttp(url: str, seconds: float) -> float:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.post(url + "/v1/chat/completions", data=BODY,
                                    headers={"content-type": "application/json"}) as response:
                await response.read()

        return await _drive(one, seconds)


async def bench_httpx(url: str, seconds: float) -> float:
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits) as client:

        async def one() -> None:
            response = await client.post(url + "/v1/chat/completions", content=BODY,
                                         headers={"content-type": "application/json"})
            await response.aread()

        return await _drive(one, seconds)


CLIENTS = {"lmserve UpstreamPool (httptools)": bench_lmserve, "aiohttp": bench_aiohttp, "httpx": bench_httpx}


def compare(url: str, seconds: float) -> dict[str, float]:
    results = {}
    for name, bench in CLIENTS.items():
        uvloop.run(bench(url, 1.0))  # warm-up
        results[name] = uvloop.run(bench(url, seconds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    for name, rate in compare(args.url, args.seconds).items():
        print(f"{name}: {rate:.0f} req/s")


if __name__ == "__main__":
    main()
