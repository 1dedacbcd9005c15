"""Runs a workload against an endpoint at full concurrency or at a Poisson arrival rate."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from lmserve.bench.client import RequestResult, Target, send
from lmserve.bench.workload import RequestSpec


@dataclass
class LoadShape:
    """How requests arrive: at most `concurrency` in flight, and (optionally) a Poisson rate."""

    concurrency: int = 64
    rate: float | None = None
    """Requests per second on average (exponential gaps); None sends as fast as concurrency allows."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")


@dataclass
class RunResult:
    """Every request's result in the order of the workload; `duration` runs from the first send to the
    last response, and each RequestResult.started is on the same clock as `started`."""

    results: list[RequestResult]
    duration: float
    started: float = 0.0
    """time.perf_counter() when the first request was sent."""


async def run(target: Target, specs: list[RequestSpec], shape: LoadShape, timeout: float = 3600.0,
              on_done: Callable[[RequestResult], None] | None = None) -> RunResult:
    """Sends `specs` in order under `shape`; `on_done` (for progress) is called as each one finishes."""
    rng = random.Random(shape.seed)
    gate = asyncio.Semaphore(shape.concurrency)
    connector = aiohttp.TCPConnector(limit=shape.concurrency, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    results: list[RequestResult | None] = [None] * len(specs)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def one(i: int, spec: RequestSpec) -> None:
            async with gate:
                results[i] = result = await send(session, target, spec)
            if on_done is not None:
                on_done(result)

        started = time.perf_counter()
        tasks = []
        for i, spec in enumerate(specs):
            if shape.rate is not None and i:
                await asyncio.sleep(rng.expovariate(shape.rate))
            tasks.append(asyncio.create_task(one(i, spec)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    return RunResult([r for r in results if r is not None], duration, started)
