"""Chaos: the gateway and servers under streaming load while things break (issue 14).

    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --scale small   # ~10 min on 2 busy cores
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --scale full --write  # ~30-60 min on 2 cores
    ... benchmarks/chaos.py --url http://127.0.0.1:8000 --admin-key KEY   # an existing local stack

Without --url it starts `lmserve up` (2 demo servers, limits in its own Redis) on free loopback
ports in a temp home and stops it at the end. Scenarios, each under streaming load with its own key:
  a  kill -9 one server mid-load (`lmserve up` restarts it)
  b  overload: Poisson arrivals at 3x the capacity measured just before
  c  30% of clients disconnect after 3 chunks
  d  restart Redis (the limits store) under a key limited in requests per minute (needs a started stack)
Per scenario: requests sent, completed, refused (429/503 with Retry-After, median seconds to the
refusal), clean error events, cut silently, other 5xx, double-charged (ledger vs what clients saw),
seconds until every backend is back, and whether the stack still serves afterwards. Recovery in (a)
is measured under load, from the killed server's /ready 200 to the gateway having every backend
healthy again (and the first request seen on it); in (b)-(d) from the end of the load, with how often
a backend was out of rotation during it. Progress lines every 15 s.
Targets: 0 cut silently, 0 double-charged, 0 5xx from the gateway itself, every backend back within
10 s of its server's return. The bugs found are reported, not fixed here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.chaos_client import LoadResult, LoadSpec, run_load
from benchmarks.chaos_stack import MODEL, Stack, server_pid, start_stack
from benchmarks.results import write_section

SCALES = {
    # concurrency (streams at once), max_tokens, requests per closed-loop scenario (c, d x2), seconds of
    # overload at 3x capacity (b), calibration requests, and a cap on any scenario's arrivals (seconds).
    # `full` is the size: 12 streams running when a server is killed (issue 14, item 8).
    "small": {"requests": 24, "concurrency": 6, "max_tokens": 32, "overload_seconds": 10, "calibrate": 12,
              "max_seconds": 300},
    "full": {"requests": 120, "concurrency": 12, "max_tokens": 96, "overload_seconds": 60, "calibrate": 36,
             "max_seconds": 900},
}
RECOVERY_TIMEOUT = 300.0
UNBOUNDED = 1_000_000  # requests of a closed loop that runs until told to stop
RATE_WINDOW = 60.0  # the gateway's default limits.window_seconds (the stack sets no other)


@dataclass
class Row:
    scenario: str
    result: LoadResult
    charged_requests: int = 0
    charged_excess_tokens: int = 0
    back_seconds: float | None = None
    back_after_return: float | None = None
    still_serving: bool = False
    notes: list[str] = field(default_factory=list)


class Watch:
    """Samples the gateway's view of the backends (every 0.25 s) while a scenario runs: how long any
    backend was out of rotation, and when all were last seen back."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.out_seconds = 0.0
        self.num_samples = self.num_out = 0
        self.last_out: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            is_back = await asyncio.to_thread(self.stack.all_backends_back)
            self.num_samples += 1
            if not is_back:
                self.num_out += 1
                self.last_out = time.monotonic()
            await asyncio.sleep(max(0.0, 0.25 - (time.monotonic() - before)))

    def start(self) -> Watch:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def note(self) -> str:
        return f"backends out of rotation in {self.num_out} of {self.num_samples} samples (0.25 s apart) during the load"


async def _progress(letter: str, result: LoadResult, started: float) -> None:
    """One line every 15 s, so a long run shows it is alive."""
    while True:
        await asyncio.sleep(15)
        counts = {k: result.count(k) for k in ("completed", "refused", "error_event", "cut", "gateway_5xx",
                                                  "transport", "left")}
        print(f"  {letter} +{time.monotonic() - started:.0f}s: {len(result.outcomes)} ended "
              + " ".join(f"{k} {v}" for k, v in counts.items() if v), flush=True)


async def _load(stack: Stack, key: str, letter: str, spec: LoadSpec, stop: asyncio.Event | None = None,
                max_seconds: float | None = None) -> LoadResult:
    """`run_load` with progress lines and arrivals capped at `max_seconds`."""
    stop = stop or asyncio.Event()
    result = LoadResult()
    started = time.monotonic()
    ticker = asyncio.create_task(_progress(letter, result, started))
    cap = asyncio.get_running_loop().call_later(max_seconds, stop.set) if max_seconds else None
    try:
        return await run_load(stack.url, key, MODEL, spec, stop=stop, result=result)
    finally:
        ticker.cancel()
        if cap is not None:
            cap.cancel()


def _double_charged(stack: Stack, key_id: str, row: Row, max_tokens: int) -> None:
    """Ledger requests beyond the streams that got a 200 head, and ledger completion tokens beyond what
    the clients saw (streams without a usage chunk count as up to `max_tokens`)."""
    ledger = stack.settled_usage(key_id)
    outcomes = row.result.outcomes
    started = sum(1 for o in outcomes if o.status == 200)
    seen = sum(o.completion_tokens for o in outcomes if o.has_usage)
    unseen_bound = max_tokens * sum(1 for o in outcomes if o.status == 200 and not o.has_usage)
    row.charged_requests = max(0, ledger["requests"] - started)
    row.charged_excess_tokens = max(0, ledger["completion_tokens"] - seen - unseen_bound)
    row.notes.append(f"ledger {ledger['requests']} req / {ledger['completion_tokens']} completion tok; "
                     f"clients: {started} streams, {seen} tok seen")


async def _wait_back(stack: Stack, since: float) -> float:
    while time.monotonic() - since < RECOVERY_TIMEOUT:
        if await asyncio.to_thread(stack.all_backends_back):
            return time.monotonic() - since
        await asyncio.sleep(0.1)
    raise RuntimeError("backends not back in time")


def _serves(stack: Stack, key: str) -> bool:
    """Three streamed requests in a row complete after the scenario."""
    result = asyncio.run(run_load(stack.url, key, MODEL, LoadSpec(3, 1, 8, seed=99)))
    return result.count("completed") == 3


async def _ready_again(victim: str, killed: float) -> float:
    """When the killed server's /ready answers 200 again, having first been seen down."""
    seen_down = False
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() - killed < RECOVERY_TIMEOUT:
            try:
                is_ready = (await client.get(victim + "/ready")).status_code == 200
            except httpx.HTTPError:
                is_ready = False
            seen_down = seen_down or not is_ready
            if is_ready and seen_down:
                return time.monotonic()
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{victim} never came back")


async def _server_requests(victim: str) -> tuple[float, float]:
    """(finished, running) requests of a server: its request_success + request_failure counters, and
    its running gauge."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(victim + "/metrics")).text
    finished = running = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("lmserve:request_success_total", "lmserve:request_failure_total"):
            finished += float(line.rsplit(" ", 1)[1])
        elif name == "lmserve:num_requests_running":
            running += float(line.rsplit(" ", 1)[1])
    return finished, running


async def _first_routed(victim: str, since: float) -> float | None:
    """Seconds from `since` until the returned server runs or has finished a request it had not at
    `since` (its own warm-up never counts: it is not an HTTP request)."""
    baseline: float | None = None
    while time.monotonic() - since < RECOVERY_TIMEOUT:
        try:
            finished, running = await _server_requests(victim)
            baseline = finished if baseline is None else baseline
            if running > 0 or finished > baseline:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    return None


async def _kill_server(stack: Stack, key: str, scale: dict) -> Row:
    """Closed-loop streams run from before the kill until the gateway routes to the returned server
    again (and 5 s more), so recovery is measured under load, from the server's return."""
    stop = asyncio.Event()
    spec = LoadSpec(UNBOUNDED, scale["concurrency"], scale["max_tokens"], seed=1)
    load = asyncio.create_task(_load(stack, key, "a", spec, stop, scale["max_seconds"] + RECOVERY_TIMEOUT))
    await asyncio.sleep(5.0)
    victim = (await asyncio.to_thread(stack.backends))[0]["url"]
    os.kill(server_pid(victim), signal.SIGKILL)
    killed = time.monotonic()
    print(f"  a: killed {victim}; waiting for it to be ready again", flush=True)
    returned = await _ready_again(victim, killed)
    print(f"  a: ready again after {returned - killed:.1f} s; waiting for the gateway to route to it", flush=True)
    is_loaded = not load.done()
    back_after, routed_after = await asyncio.gather(_wait_back(stack, returned), _first_routed(victim, returned))
    is_loaded = is_loaded and not load.done()
    await asyncio.sleep(5.0)
    stop.set()
    row = Row("a: kill -9 a server", await load)
    row.back_seconds = returned - killed + back_after
    row.back_after_return = back_after
    row.notes.append(f"server {victim} ready again {returned - killed:.1f} s after the kill; every backend "
                     f"healthy in the gateway {back_after:.1f} s later; first request on it "
                     + ("never" if routed_after is None else f"{routed_after:.1f} s") + " after its return"
                     + ("" if is_loaded else "; NOTE: the load had ended before recovery was measured"))
    return row


async def _overload(stack: Stack, key: str, scale: dict) -> Row:
    calibration = LoadSpec(scale["calibrate"], scale["concurrency"], scale["max_tokens"], seed=2)
    start = time.monotonic()
    measured = await _load(stack, key, "b calibration", calibration)
    capacity = measured.count("completed") / (time.monotonic() - start)
    rate = 3 * capacity
    num = max(1, int(rate * scale["overload_seconds"]))
    spec = LoadSpec(num, num, scale["max_tokens"], rate=rate, seed=3)
    watch = Watch(stack).start()
    row = Row("b: overload at 3x capacity", await _load(stack, key, "b", spec, max_seconds=scale["max_seconds"]))
    ended = time.monotonic()
    await watch.stop()
    row.result.outcomes = measured.outcomes + row.result.outcomes  # the ledger holds both runs
    row.notes.append(f"capacity {capacity:.2f} req/s at concurrency {scale['concurrency']}; "
                     f"overload {rate:.2f} req/s for {scale['overload_seconds']} s ({num} requests); "
                     + watch.note())
    row.back_seconds = await _wait_back(stack, ended)
    return row


async def _disconnects(stack: Stack, key: str, scale: dict) -> Row:
    spec = LoadSpec(scale["requests"], scale["concurrency"], scale["max_tokens"], leave_share=0.3, seed=4)
    watch = Watch(stack).start()
    row = Row("c: 30% of clients disconnect", await _load(stack, key, "c", spec, max_seconds=scale["max_seconds"]))
    ended = time.monotonic()
    await watch.stop()
    row.notes.append(watch.note())
    row.back_seconds = await _wait_back(stack, ended)
    return row


def _most_admitted(result: LoadResult, window: float) -> int:
    """The most 200 heads within any `window` seconds starting at one of them: no fixed window of the
    limiter can have admitted more (a window opens at a request), so above `rpm` is a breach."""
    times = sorted(o.admitted_at for o in result.outcomes if o.admitted_at is not None)
    return max((sum(1 for t in times[i:] if t - first < window) for i, first in enumerate(times)), default=0)


async def _redis_restart(stack: Stack, key: str, scale: dict, rpm: int) -> Row:
    if stack.redis is None:
        raise RuntimeError("scenario d restarts the Redis that chaos.py started; it needs a started stack")
    spec = LoadSpec(scale["requests"] * 2, max(2, scale["concurrency"] // 2), 8, rate=4.0, seed=5)
    watch = Watch(stack).start()
    load = asyncio.create_task(_load(stack, key, "d", spec, max_seconds=scale["max_seconds"]))
    await asyncio.sleep(2.0)
    await asyncio.to_thread(stack.redis.stop)
    down = time.monotonic()
    await asyncio.sleep(3.0)
    await asyncio.to_thread(stack.redis.start)
    down_seconds = time.monotonic() - down
    row = Row("d: restart Redis (rpm-limited key)", await load)
    ended = time.monotonic()
    await watch.stop()
    admitted = sum(1 for o in row.result.outcomes if o.status == 200)
    most = _most_admitted(row.result, RATE_WINDOW)
    row.notes.append(f"Redis down {down_seconds:.1f} s; key rpm {rpm}: {admitted} admitted of "
                     f"{len(row.result.outcomes)}, at most {most} within any {RATE_WINDOW:.0f} s"
                     + (" (ABOVE the limit)" if most > rpm else "") + "; " + watch.note())
    row.back_seconds = await _wait_back(stack, ended)
    return row


def _median_refusal(result: LoadResult) -> str:
    times = [o.seconds for o in result.outcomes if o.kind == "refused"]
    return f"{len(times)} ({statistics.median(times):.2f} s)" if times else "0"


def table(rows: list[Row]) -> str:
    lines = ["| scenario | sent | completed | refused 429/503 + Retry-After (median) | clean error event "
             "| cut silently | other 5xx | no response | left on purpose | double-charged (req / tok) "
             "| backends back (s) | back after server return (s) | still serving |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row.result
        after = "-" if row.back_after_return is None else f"{row.back_after_return:.1f}"
        back = "-" if row.back_seconds is None else f"{row.back_seconds:.1f}"
        lines.append(f"| {row.scenario} | {len(r.outcomes)} | {r.count('completed')} | {_median_refusal(r)} "
                     f"| {r.count('error_event')} | {r.count('cut')} | {r.count('gateway_5xx')} "
                     f"| {r.count('transport')} | {r.count('left')} "
                     f"| {row.charged_requests} / {row.charged_excess_tokens} | {back} | {after} "
                     f"| {'yes' if row.still_serving else 'NO'} |")
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    out = []
    for row in rows:
        out.append(f"- {row.scenario}: " + "; ".join(row.notes))
        odd = {}
        for o in row.result.outcomes:
            if o.kind in ("cut", "gateway_5xx", "transport", "http_4xx"):
                odd.setdefault(f"{o.kind} {o.status}: {o.detail[:100]}", 0)
                odd[f"{o.kind} {o.status}: {o.detail[:100]}"] += 1
        out += [f"  - {count} x {what}" for what, count in sorted(odd.items())]
    return "\n".join(out)


def run(stack: Stack, scale_name: str, scenarios: str) -> list[Row]:
    scale = SCALES[scale_name]
    rows = []
    probe_key, _ = stack.create_key("chaos-probe")
    for letter in scenarios:
        name = f"chaos-{letter}-{int(time.time())}"
        rpm = max(10, scale["requests"])
        key, key_id = stack.create_key(name, **({"rpm": rpm} if letter == "d" else {}))
        print(f"scenario {letter} ...", flush=True)
        if letter == "a":
            row = asyncio.run(_kill_server(stack, key, scale))
        elif letter == "b":
            row = asyncio.run(_overload(stack, key, scale))
        elif letter == "c":
            row = asyncio.run(_disconnects(stack, key, scale))
        else:
            row = asyncio.run(_redis_restart(stack, key, scale, rpm))
        _double_charged(stack, key_id, row, scale["max_tokens"] if letter != "d" else 8)
        row.still_serving = _serves(stack, probe_key)
        print(table([row]).splitlines()[-1], flush=True)
        rows.append(row)
    return rows


def _lscpu_model() -> str:
    done = subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
    return next((line.strip() for line in done.stdout.splitlines() if line.startswith("Model name")), "lscpu: -")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--url", help="An existing local gateway (default: start `lmserve up`).")
    parser.add_argument("--admin-key", help="Its admin key (with --url).")
    parser.add_argument("--scenarios", default="abcd", help="Which of a, b, c, d to run, in order.")
    parser.add_argument("--serve", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra `lmserve serve` setting for the started stack (repeatable), "
                             "e.g. attention_backend=torch.")
    parser.add_argument("--write", action="store_true", help="Write the chaos section of RESULTS.md.")
    args = parser.parse_args()
    if args.url and not args.admin_key:
        parser.error("--url needs --admin-key")
    if any(s not in "abcd" for s in args.scenarios):
        parser.error("--scenarios takes letters from abcd")
    if any("=" not in item for item in args.serve):
        parser.error("--serve takes KEY=VALUE")
    serve = dict(item.split("=", 1) for item in args.serve)
    stack = Stack(args.url.rstrip("/"), args.admin_key) if args.url else start_stack(serve=serve)
    scenarios = args.scenarios if stack.redis is not None else args.scenarios.replace("d", "")
    try:
        rows = run(stack, args.scale, scenarios)
    finally:
        if args.url is None:
            stack.stop()
    command = "PYTHONPATH=. .venv/bin/python benchmarks/chaos.py " + " ".join(sys.argv[1:])
    body = "\n".join([f"`{command}`", "", f"{_lscpu_model()}; scale `{args.scale}`, model `{MODEL}`, "
                      "2 servers behind one gateway, limits in Redis"
                      + (f", servers with {serve}" if serve else "") + ".", "", table(rows), "", details(rows)])
    print("\n" + body)
    if args.write:
        write_section("chaos", "## Chaos\n\n" + body)


if __name__ == "__main__":
    main()
