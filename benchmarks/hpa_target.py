"""Where TTFT starts to climb on one demo server, and the waiting-requests gauge there (issue 15).

    PYTHONPATH=. .venv/bin/python benchmarks/hpa_target.py --scale small   # a check that it works, ~5 min
    PYTHONPATH=. .venv/bin/python benchmarks/hpa_target.py --scale full --write   # ~20-30 min on 2 cores

Starts `lmserve serve demo` on a free loopback port, warms it up, then runs `lmserve bench` (the
project's load generator, as a user would) at increasing concurrency with one fixed workload per step.
During each step it samples the server's `lmserve:num_requests_waiting` gauge from /metrics every
0.25 s: the metric the Helm chart's HPA acts on (deploy/helm/lmserve/templates/monitoring.yaml serves
it to the HPA as `lmserve_num_requests_waiting`, averaged over pods; its target is
`models[].autoscaling.targetWaitingPerPod` in values.yaml).

TTFT "starts to climb" at the first step whose TTFT p99 is above CLIMB_FACTOR times the lowest p99
at a lower concurrency. The recommended HPA target is the mean waiting value at that step: an HPA aiming
at it adds a pod when the average pod is as loaded as that. When waiting is still ~0 there, the gauge
cannot tell that load apart from idle, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.results import write_section  # noqa: E402
from benchmarks.servers import free_port, stop_group, wait_http  # noqa: E402

MODEL = "lmserve-demo"
METRIC = "lmserve:num_requests_waiting"
CHART_VALUES = REPO_ROOT / "deploy" / "helm" / "lmserve" / "values.yaml"
CLIMB_FACTOR = 2.0
SCALES = {
    # concurrency steps; requests per step = max(min_requests, per_stream * concurrency); token ranges
    # that fit the demo model's 512 positions.
    "small": {"steps": [1, 2, 4, 8], "per_stream": 2, "min_requests": 6, "input_len": "64:128",
              "output_len": "16:32"},
    "full": {"steps": [1, 2, 4, 8, 16, 32], "per_stream": 4, "min_requests": 16, "input_len": "128:256",
             "output_len": "64:128"},
}


@dataclass
class Step:
    concurrency: int
    summary: dict
    waiting: list[float] = field(default_factory=list)
    running: list[float] = field(default_factory=list)

    @property
    def ttft_p99(self) -> float:
        return float(self.summary.get("ttft_p99") or 0.0)

    def mean(self, values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0


def _gauges(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in (METRIC, "lmserve:num_requests_running"):
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Sampler(threading.Thread):
    """Reads the gauges every 0.25 s until stopped (a scrape that fails is skipped, not zero)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.waiting: list[float] = []
        self.running: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.done.wait(0.25):
                try:
                    gauges = _gauges(client.get(self.url + "/metrics").text)
                except httpx.HTTPError:
                    continue
                self.waiting.append(gauges.get(METRIC, 0.0))
                self.running.append(gauges.get("lmserve:num_requests_running", 0.0))


def _bench(url: str, concurrency: int, num_requests: int, scale: dict, seed: int, out: Path) -> dict:
    """One `lmserve bench` run; its JSON summary."""
    argv = [sys.executable, "-m", "lmserve.cli", "bench", "--base-url", url + "/v1", "--model", MODEL,
            "--num-requests", str(num_requests), "--concurrency", str(concurrency), "--input-len",
            scale["input_len"], "--output-len", scale["output_len"], "--vocab", "100:4000", "--seed", str(seed),
            "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"lmserve bench failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def sweep(url: str, scale: dict, workdir: Path) -> list[Step]:
    steps = []
    # Untimed: the first batches of each size pay one-off costs (kernel set-up per shape), which made
    # the lowest step look slowest in a first try.
    top = max(scale["steps"])
    _bench(url, top, 2 * top, scale, seed=1000, out=workdir / "warmup.json")
    for concurrency in scale["steps"]:
        num = max(scale["min_requests"], scale["per_stream"] * concurrency)
        print(f"concurrency {concurrency}: {num} requests ...", flush=True)
        sampler = Sampler(url)
        sampler.start()
        try:
            summary = _bench(url, concurrency, num, scale, seed=concurrency, out=workdir / f"c{concurrency}.json")
        finally:
            sampler.done.set()
            sampler.join()
        step = Step(concurrency, summary, sampler.waiting, sampler.running)
        print("  " + _row(step), flush=True)
        steps.append(step)
    return steps


def _row(step: Step) -> str:
    s = step.summary
    return (f"| {step.concurrency} | {s['num_ok']}/{s['num_requests']} | {s['ttft_p50'] * 1000:.0f} "
            f"| {step.ttft_p99 * 1000:.0f} | {s['request_throughput']:.2f} | {s['output_throughput']:.1f} "
            f"| {step.mean(step.waiting):.2f} | {max(step.waiting, default=0):.0f} | {step.mean(step.running):.2f} |")


def chart_target() -> float:
    """The chart's default `models[0].autoscaling.targetWaitingPerPod`."""
    values = yaml.safe_load(CHART_VALUES.read_text())
    return float(values["models"][0]["autoscaling"]["targetWaitingPerPod"])


def knee(steps: list[Step]) -> tuple[Step, float] | None:
    """The first step whose TTFT p99 is above CLIMB_FACTOR x the lowest p99 at a lower concurrency
    (the lowest, not the first: one noisy step must not hide a climb), with that p99; else None."""
    for i, step in enumerate(steps[1:], start=1):
        base = min(s.ttft_p99 for s in steps[:i])
        if step.ttft_p99 > CLIMB_FACTOR * base:
            return step, base
    return None


def report(steps: list[Step]) -> str:
    lines = ["| concurrency | ok | TTFT p50 (ms) | TTFT p99 (ms) | req/s | output tok/s | waiting mean "
             "| waiting max | running mean |", "|---|---|---|---|---|---|---|---|---|",
             *(_row(s) for s in steps), ""]
    found = knee(steps)
    if found is None:
        lines.append(f"TTFT p99 never exceeded {CLIMB_FACTOR:g}x its lowest value at a lower concurrency: "
                     "no knee in this range; no target recommended.")
        return "\n".join(lines)
    climb, base = found
    waiting = climb.mean(climb.waiting)
    chart = chart_target()
    lines.append(f"TTFT p99 climbs at concurrency {climb.concurrency}: {climb.ttft_p99 * 1000:.0f} ms > "
                 f"{CLIMB_FACTOR:g} x {base * 1000:.0f} ms (the lowest p99 at a lower concurrency). "
                 f"Mean waiting there: {waiting:.2f} (max {max(climb.waiting, default=0):.0f}).")
    if waiting < 0.5:
        lines.append(f"Recommended target: none from `{METRIC}` (it is ~0 where TTFT climbs: the server runs "
                     "every request at once and TTFT grows with the batch, not the queue). The chart's "
                     f"{chart:g} waiting per pod scales out only beyond this load.")
    else:
        target = max(1, round(waiting))
        verdict = "matches" if abs(target - chart) <= 1 else "differs from"
        lines.append(f"Recommended target: {target} waiting per pod; this {verdict} the chart's default "
                     f"targetWaitingPerPod {chart:g}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="Extra `lmserve serve` argument (repeatable), e.g. --serve-arg=--attention-backend=torch.")
    parser.add_argument("--write", action="store_true", help="Write the hpa_target section of RESULTS.md.")
    args = parser.parse_args()
    scale = SCALES[args.scale]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="lmserve-hpa-") as tmp:
        workdir = Path(tmp)
        with open(workdir / "serve.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "lmserve.cli", "serve", "demo", "--host", "127.0.0.1",
                                     "--port", str(port), "--log-level", "warning", *args.serve_arg],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
        try:
            wait_http(url + "/ready", timeout=900, proc=proc)
            deadline = time.monotonic() + 300
            while httpx.get(url + "/ready", timeout=5).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server never became ready")
                time.sleep(0.5)
            steps = sweep(url, scale, workdir)
        except BaseException:
            print((workdir / "serve.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            stop_group(proc, timeout=60)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/hpa_target.py " + " ".join(sys.argv[1:])
    body = "\n".join([f"`{command}`", "", f"scale `{args.scale}`: one `lmserve serve demo`, `lmserve bench` "
                      f"with input {scale['input_len']} / output {scale['output_len']} tokens per step; "
                      f"`{METRIC}` sampled every 0.25 s.", "", report(steps)])
    print("\n" + body)
    if args.write:
        write_section("hpa_target", "## HPA target: where TTFT climbs (issue 15)\n\n" + body)


if __name__ == "__main__":
    main()
