"""Gateway overhead: direct vs lmserve gateway vs LiteLLM proxy vs vllm-router, one fast mock upstream.

    python benchmarks/gateway_overhead.py                # everything, writes benchmarks/RESULTS.md
    python benchmarks/gateway_overhead.py --only lmserve --no-write
    python benchmarks/gateway_overhead.py --only lmserve --baseline ace12f1   # before/after, one run

Measures, for each target in front of the same mock upstream (benchmarks/mock_upstream.py):
- max requests/s at 64 connections (wrk, non-streamed chat completions, `--duration` seconds);
- added p50/p99 latency at a fixed 200 req/s (open loop: requests start on schedule, whatever the
  previous ones do), against the same client going direct;
- streamed time to first byte (p50/p99 over sequential streamed requests).

CPU accounting on a 2-core machine: the gateway under test is pinned to core 1 alone; wrk, the mock
upstream and this script's latency client share core 0. Every gateway thus gets exactly one core
(vllm-router's worker threads included), and the load side never competes with it. "direct" is
wrk -> mock on core 0: the ceiling of the load side itself.

Reference gateways live in their own venvs under benchmarks/.venvs/ (created here when missing):
LiteLLM proxy (`litellm[proxy]`, master key on) and vllm-router (PyPI, Rust). The lmserve gateway
runs with auth (an API key) and rate limits (RPM and TPM on the key, in-process) on.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import write_section
from benchmarks.servers import free_port, stop_group, wait_http
from lmserve.gateway.upstream import UpstreamError, UpstreamPool

VENVS = REPO / "benchmarks" / ".venvs"
LOAD_CORE, GATEWAY_CORE = "0", "1"
BODY = b'{"model":"mock","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'
STREAM_BODY = (b'{"model":"mock","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8,'
               b'"stream":true}')
MASTER_KEY = "sk-bench-master-key"


def pinned(core: str, args: list[str]) -> list[str]:
    return ["taskset", "-c", core, *args] if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1 \
        else args


def _log(path: Path) -> int:
    """A file descriptor for a child's stderr (the child keeps it; closed when this script exits)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def ensure_venv(name: str, requirement: str) -> Path:
    venv = VENVS / name
    if not (venv / ".installed").exists():
        print(f"creating {venv} with {requirement} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], check=True)
        (venv / ".installed").touch()
    return venv


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


def start_lmserve(upstream: str, tmp: Path, source: Path = REPO, label: str = "lmserve gateway") -> Target:
    """The gateway from `source` (this checkout, or an export of an older commit for --baseline),
    with its key made by that source's own key store."""
    work = tmp / label.replace(" ", "-")
    work.mkdir(exist_ok=True)
    db = f"sqlite:///{work / 'gateway.db'}"
    env = {**os.environ, "PYTHONPATH": str(source)}
    key = subprocess.run([sys.executable, "-c", "import sys; from lmserve.gateway.keystore import KeyStore; "
                          "print(KeyStore(sys.argv[1]).create_key('bench', rpm=10**9, tpm=10**12)[0])", db],
                         cwd=source, env=env, capture_output=True, text=True, check=True).stdout.strip()
    port = free_port()
    config = {"models": [{"name": "mock", "backends": [{"url": upstream}]}], "port": port, "database_url": db,
              "access_log": False, "log_level": "warning", "health": {"probe_interval": 5}}
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(pinned(GATEWAY_CORE, [sys.executable, "-m", "lmserve.cli", "gateway", "-c", str(path)]),
                            cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=_log(work / "gateway.log"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=proc)
    return Target(label, url, {"authorization": f"Bearer {key}"}, proc)


def export_commit(ref: str, tmp: Path) -> tuple[Path, str]:
    """The tree of `ref` in a directory (no checkout touched) and its short hash."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    target = tmp / f"baseline-{commit}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target, commit


def start_litellm(upstream: str, tmp: Path) -> Target:
    venv = ensure_venv("litellm", "litellm[proxy]")
    port = free_port()
    config = {"model_list": [{"model_name": "mock", "litellm_params": {
        "model": "openai/mock", "api_base": upstream + "/v1", "api_key": "unused"}}],
        "general_settings": {"master_key": MASTER_KEY}, "litellm_settings": {"telemetry": False}}
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    proc = subprocess.Popen(pinned(GATEWAY_CORE, [str(venv / "bin" / "litellm"), "--config", str(path), "--host",
                                                  "127.0.0.1", "--port", str(port), "--num_workers", "1"]),
                            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=_log(tmp / "litellm.log"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", timeout=300, proc=proc)
    return Target("LiteLLM proxy", url, {"authorization": f"Bearer {MASTER_KEY}"}, proc)


def start_vllm_router(upstream: str, tmp: Path) -> Target:
    venv = ensure_venv("vllm-router", "vllm-router")
    port = free_port()
    proc = subprocess.Popen(pinned(GATEWAY_CORE, [str(venv / "bin" / "vllm-router"), "--host", "127.0.0.1",
                                                  "--port", str(port), "--worker-urls", upstream,
                                                  "--policy", "round_robin", "--log-level", "warning",
                                                  "--prometheus-port", str(free_port())]),
                            cwd=tmp, stdout=subprocess.DEVNULL, stderr=_log(tmp / "vllm-router.log"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", timeout=120, proc=proc)
    return Target("vllm-router", url, {}, proc)


def wrk_max_rps(target: Target, duration: int, tmp: Path) -> tuple[float, int]:
    """Requests/s at 64 connections and the number of non-2xx responses."""
    lines = ['wrk.method = "POST"', f"wrk.body = '{BODY.decode()}'", 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers.items()]
    script = tmp / "post.lua"
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(pinned(LOAD_CORE, ["wrk", "-t1", "-c64", f"-d{duration}s", "--timeout", "10s", "-s", str(script),
                                            target.url + "/v1/chat/completions"]),
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    num_errors = int(errors.group(1)) if errors else 0
    if socket_errors:
        num_errors += sum(int(x) for x in socket_errors.groups())
    return rps, num_errors


async def _fixed_rate(target: Target, rate: float, num: int, body: bytes,
                      first_byte: bool) -> tuple[list[float], int]:
    """Latencies of the successful requests, and the number that failed (error status or none)."""
    pool = UpstreamPool()
    headers = [(b"content-type", b"application/json")] + [(k.encode(), v.encode()) for k, v in target.headers.items()]
    latencies: list[float] = []
    failures = 0
    loop = asyncio.get_running_loop()

    async def one() -> None:
        # Timed from the actual send: the loop's timer jitter (up to 1 ms on uvloop) is not latency.
        nonlocal failures
        sent = time.perf_counter()
        latency = None
        try:
            response = await pool.request(target.url, b"POST", b"/v1/chat/completions", headers, body, 5.0, 30.0)
            try:
                async for _ in response.chunks():
                    if latency is None and first_byte:
                        latency = time.perf_counter() - sent
                if not first_byte:
                    latency = time.perf_counter() - sent
            finally:
                response.release()
        except UpstreamError:
            failures += 1
            return
        if response.status != 200 or latency is None:
            failures += 1
        else:
            latencies.append(latency)

    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(num):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one()))
    await asyncio.gather(*tasks)
    pool.close()
    return latencies, failures


def fixed_rate(target: Target, rate: float, num: int, body: bytes = BODY,
               first_byte: bool = False) -> tuple[list[float], int]:
    uvloop.run(_fixed_rate(target, rate, min(num, 400), body, first_byte))  # warms connections
    return uvloop.run(_fixed_rate(target, rate, num, body, first_byte))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Result:
    name: str
    rps: list[float] = field(default_factory=list)
    errors: int = 0
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    ttfb_p50: list[float] = field(default_factory=list)
    ttfb_p99: list[float] = field(default_factory=list)


def measure(target: Target, result: Result, args: argparse.Namespace, tmp: Path) -> None:
    wrk_max_rps(target, 2, tmp)  # warm-up
    rps, errors = wrk_max_rps(target, args.duration, tmp)
    result.rps.append(rps)
    result.errors += errors
    latencies, failed = fixed_rate(target, args.rate, int(args.rate * args.latency_seconds))
    result.p50.append(pct(latencies, 0.5) * 1000)
    result.p99.append(pct(latencies, 0.99) * 1000)
    ttfb, failed_streams = fixed_rate(target, 50, 500, STREAM_BODY, first_byte=True)
    result.errors += failed + failed_streams
    result.ttfb_p50.append(pct(ttfb, 0.5) * 1000)
    result.ttfb_p99.append(pct(ttfb, 0.99) * 1000)
    print(f"  {target.name}: {rps:.0f} req/s ({errors} errors), p50 {result.p50[-1]:.3f} ms, "
          f"p99 {result.p99[-1]:.3f} ms, stream TTFB p50 {result.ttfb_p50[-1]:.3f} ms", flush=True)


def client_table(upstream: str) -> str:
    """benchmarks/upstream_clients.py on the gateway's core: CPU cost of the upstream client alone."""
    out = subprocess.run(pinned(GATEWAY_CORE, [sys.executable, str(REPO / "benchmarks" / "upstream_clients.py"),
                                               "--url", upstream]), capture_output=True, text=True, check=True)
    rows = ["| upstream client (64 in flight, one core, uvloop) | req/s |", "|---|---|"]
    rows += [f"| {name} | {rate.split()[0]} |" for name, rate in
             (line.rsplit(": ", 1) for line in out.stdout.strip().splitlines())]
    return "\n".join(rows)


def table(results: list[Result], args: argparse.Namespace, load: str) -> str:
    med = statistics.median
    direct = results[0]
    by_name = {r.name: r for r in results}
    header = ("| target | max req/s @64 conn | errors (all runs) | p50 ms @200 req/s | added p50 ms | p99 ms | added p99 ms "
              "| stream TTFB p50 ms | TTFB p99 ms |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    saturated = [r.name for r in results if med(r.rps) < args.rate]
    for r in results:
        added50 = "-" if r is direct else f"{med(r.p50) - med(direct.p50):+.3f}"
        added99 = "-" if r is direct else f"{med(r.p99) - med(direct.p99):+.3f}"
        rows.append(f"| {r.name} | {med(r.rps):.0f} | {r.errors} | {med(r.p50):.3f} | {added50} | {med(r.p99):.3f} "
                    f"| {added99} | {med(r.ttfb_p50):.3f} | {med(r.ttfb_p99):.3f} |")
    lines = ["\n".join(rows), ""]
    if saturated:
        lines.append(f"- {', '.join(saturated)}: max req/s below {args.rate:.0f}, so the fixed-rate run queues "
                     "and its latency there measures the backlog, not per-request overhead.")
    ours = by_name.get("lmserve gateway")
    for other, target in (("LiteLLM proxy", 20.0), ("vllm-router", 0.5)):
        if ours and other in by_name:
            ratio = med(ours.rps) / med(by_name[other].rps)
            verdict = "met" if ratio >= target else "NOT met"
            # Targets run one after another in each repeat, so a run's ratio compares like with like
            # when the VM's speed drifts between repeats.
            per_run = ", ".join(f"{a / b:.2f}" for a, b in zip(ours.rps, by_name[other].rps))
            lines.append(f"- lmserve / {other} max req/s: **{ratio:.2f}x** (target >= {target}x: {verdict}; "
                         f"per run: {per_run})")
    baseline = next((r for r in results if r.name.startswith("lmserve gateway @")), None)
    if ours and baseline:
        per_run = ", ".join(f"{a / b:.2f}" for a, b in zip(ours.rps, baseline.rps))
        lines.append(f"- lmserve now / {baseline.name.removeprefix('lmserve gateway ')} max req/s: "
                     f"**{med(ours.rps) / med(baseline.rps):.2f}x** (per run: {per_run}); added p50 "
                     f"{med(ours.p50) - med(direct.p50):.3f} ms now vs {med(baseline.p50) - med(direct.p50):.3f} ms")
    if ours:
        added = med(ours.p50) - med(direct.p50)
        lines.append(f"- lmserve added p50 at {args.rate:.0f} req/s: **{added:.3f} ms** "
                     f"(target < 1 ms: {'met' if added < 1 else 'NOT met'})")
    lines += [
        "",
        (f"Command: `{' '.join(['python', 'benchmarks/gateway_overhead.py', *sys.argv[1:]])}`; "
         f"medians of {args.repeat} run(s); wrk -t1 -c64 -d{args.duration}s; "
         f"{args.latency_seconds:.0f} s at {args.rate:.0f} req/s open loop; 500 streamed requests at 50 req/s "
         f"for TTFB. Load average before the run: {load}."),
        "",
        ("Set-up: one mock upstream (benchmarks/mock_upstream.py, canned responses). Each gateway is pinned alone "
         "to core 1; wrk, the mock and the latency client share core 0 (`direct` = the load side's own ceiling). "
         "lmserve: API-key auth and per-key RPM+TPM limits (in-process) on, access log off. "
         "LiteLLM proxy: master key on, 1 worker. vllm-router: round_robin, no auth. All log at warning level."),
    ]
    return "\n".join(lines)


STARTERS = {"lmserve": start_lmserve, "litellm": start_litellm, "vllm-router": start_vllm_router}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="wrk seconds per max-RPS run")
    parser.add_argument("--rate", type=float, default=200.0, help="fixed request rate for the latency test")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2, help="runs per target; medians are reported")
    parser.add_argument("--only", action="append", choices=sorted(STARTERS), help="targets besides direct")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    parser.add_argument("--baseline", metavar="REF", help="also run the lmserve gateway of this git commit, "
                        "interleaved with today's (before/after in one run)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    load = Path("/proc/loadavg").read_text().split()[0]
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    mock_port = free_port()
    mock = subprocess.Popen(pinned(LOAD_CORE, [sys.executable, str(REPO / "benchmarks" / "mock_upstream.py"),
                                               "--port", str(mock_port)]))
    upstream = f"http://127.0.0.1:{mock_port}"
    os.sched_setaffinity(0, {int(LOAD_CORE)}) if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1 \
        else None
    results = [Result("direct")]
    try:
        wait_http(upstream + "/health")
        starters = {name: STARTERS[name] for name in args.only or list(STARTERS)}
        if args.baseline:
            source, commit = export_commit(args.baseline, tmp)
            label = f"lmserve gateway @{commit}"
            starters = {"lmserve": start_lmserve, "baseline": functools.partial(
                start_lmserve, source=source, label=label), **starters}
        names = list(starters)
        results += [Result(n) for n in names]
        for _ in range(args.repeat):
            measure(Target("direct", upstream), results[0], args, tmp)
            for name, result in zip(names, results[1:]):
                target = starters[name](upstream, tmp)
                result.name = target.name
                try:
                    measure(target, result, args, tmp)
                finally:
                    target.stop()
        clients = client_table(upstream)
    finally:
        mock.terminate()
        mock.wait(5)
    markdown = table(results, args, load) + "\n\nWhy a custom upstream client (`benchmarks/upstream_clients.py`):\n\n" + clients
    print(markdown)
    if not args.no_write:
        write_section("gateway_overhead", "## Gateway overhead\n\n" + markdown)


if __name__ == "__main__":
    main()
