"""Chaos: the gateway and servers under streaming load while things break (issue 14).

    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --scale small   # ~2 min of load, a quick check
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --scale full    # writes the `chaos` section
    ... benchmarks/chaos.py --url http://127.0.0.1:8000 --admin-key KEY   # an existing local stack

Without --url it starts `lmserve up` (2 demo servers, limits in its own Redis) on free loopback
ports in a temp home and stops it at the end. Scenarios, each under streaming load with its own key:
  a  kill -9 one server mid-load (`lmserve up` restarts it)
  b  overload: Poisson arrivals at 3x the capacity measured just before
  c  30% of clients disconnect after 3 chunks
  d  restart Redis (the limits store) under a key limited in requests per minute (needs a started stack)
Per scenario: requests sent, completed, refused (429/503 with Retry-After, median seconds to the
refusal), clean error events, cut silently, other 5xx, double-charged (ledger vs what clients saw),
seconds until every backend is back, and whether the stack still serves afterwards.
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
    # requests, concurrency, max_tokens per scenario; seconds of overload; calibration requests
    "small": {"requests": 24, "concurrency": 6, "max_tokens": 32, "overload_seconds": 10, "calibrate": 12},
    "full": {"requests": 200, "concurrency": 24, "max_tokens": 96, "overload_seconds": 60, "calibrate": 48},
}
RECOVERY_TIMEOUT = 300.0


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
        await asyncio.sleep(0.25)
    raise RuntimeError("backends not back in time")


def _serves(stack: Stack, key: str) -> bool:
    """Three streamed requests in a row complete after the scenario."""
    result = asyncio.run(run_load(stack.url, key, MODEL, LoadSpec(3, 1, 8, seed=99)))
    return result.count("completed") == 3


async def _kill_server(stack: Stack, key: str, scale: dict) -> Row:
    spec = LoadSpec(scale["requests"], scale["concurrency"], scale["max_tokens"], seed=1)
    load = asyncio.create_task(run_load(stack.url, key, MODEL, spec))
    await asyncio.sleep(2.0)
    victim = (await asyncio.to_thread(stack.backends))[0]["url"]
    os.kill(server_pid(victim), signal.SIGKILL)
    killed = time.monotonic()
    async with httpx.AsyncClient(timeout=2) as client:
        while True:  # down first (the supervisor may not have noticed yet), then up again
            try:
                if (await client.get(victim + "/ready")).status_code == 200 and time.monotonic() - killed > 1:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - killed > RECOVERY_TIMEOUT:
                raise RuntimeError(f"{victim} never came back")
            await asyncio.sleep(0.1)
    returned = time.monotonic()
    back_after_return = await _wait_back(stack, returned)
    row = Row("a: kill -9 a server", await load)
    row.back_seconds = time.monotonic() - killed
    row.back_after_return = back_after_return
    row.notes.append(f"server {victim} ready again {returned - killed:.1f} s after the kill")
    return row


async def _overload(stack: Stack, key: str, scale: dict) -> Row:
    calibration = LoadSpec(scale["calibrate"], scale["concurrency"], scale["max_tokens"], seed=2)
    start = time.monotonic()
    measured = await run_load(stack.url, key, MODEL, calibration)
    capacity = measured.count("completed") / (time.monotonic() - start)
    rate = 3 * capacity
    num = max(1, int(rate * scale["overload_seconds"]))
    spec = LoadSpec(num, num, scale["max_tokens"], rate=rate, seed=3)
    row = Row("b: overload at 3x capacity", await run_load(stack.url, key, MODEL, spec))
    row.result.outcomes = measured.outcomes + row.result.outcomes  # the ledger holds both runs
    row.notes.append(f"capacity {capacity:.2f} req/s at concurrency {scale['concurrency']}; "
                     f"overload {rate:.2f} req/s for {scale['overload_seconds']} s ({num} requests)")
    row.back_seconds = await _wait_back(stack, time.monotonic())
    return row


async def _disconnects(stack: Stack, key: str, scale: dict) -> Row:
    spec = LoadSpec(scale["requests"], scale["concurrency"], scale["max_tokens"], leave_share=0.3, seed=4)
    row = Row("c: 30% of clients disconnect", await run_load(stack.url, key, MODEL, spec))
    row.back_seconds = await _wait_back(stack, time.monotonic())
    return row


async def _redis_restart(stack: Stack, key: str, scale: dict, rpm: int) -> Row:
    if stack.redis is None:
        raise RuntimeError("scenario d restarts the Redis that chaos.py started; it needs a started stack")
    spec = LoadSpec(scale["requests"] * 2, max(2, scale["concurrency"] // 2), 8, rate=4.0, seed=5)
    load = asyncio.create_task(run_load(stack.url, key, MODEL, spec))
    await asyncio.sleep(2.0)
    await asyncio.to_thread(stack.redis.stop)
    down = time.monotonic()
    await asyncio.sleep(3.0)
    await asyncio.to_thread(stack.redis.start)
    row = Row("d: restart Redis (rpm-limited key)", await load)
    admitted = sum(1 for o in row.result.outcomes if o.status == 200)
    row.notes.append(f"Redis down {time.monotonic() - down:.1f} s; key rpm {rpm}: {admitted} admitted "
                     f"of {len(row.result.outcomes)} within the window")
    row.back_seconds = await _wait_back(stack, time.monotonic())
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
