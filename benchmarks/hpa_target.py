"""Where TTFT starts to climb on one demo server, and the waiting-requests gauge there (issue 15).

    PYTHONPATH=. .venv/bin/python benchmarks/hpa_target.py --scale small   # a check that it works, ~5 min
    PYTHONPATH=. .venv/bin/python benchmarks/hpa_target.py --scale full --write   # ~15-30 min on 2 cores

Starts `lmserve serve demo` on a free loopback port, warms it up, then runs `lmserve bench` (the
project's load generator, as a user would) at increasing concurrency with one fixed workload per step.
During each step it samples the server's `lmserve:num_requests_waiting` gauge from /metrics every
0.25 s: the metric the Helm chart's HPA acts on (deploy/helm/lmserve/templates/monitoring.yaml serves
it to the HPA as `lmserve_num_requests_waiting`, averaged over pods; its target is
`models[].autoscaling.targetWaitingPerPod` in values.yaml).

TTFT "starts to climb" at the first step whose TTFT p99 is above CLIMB_FACTOR times the lowest p99
at a lower concurrency. With the server's default max_num_seqs (256) every request runs at once, so
the waiting gauge stays ~0 there and cannot tell that load from idle. So a second sweep runs a server
capped at the last concurrency before the climb (`--max-num-seqs`): beyond it requests queue, and
the waiting gauge rises exactly where TTFT does. The report recommends that cap (the chart's
`models[].maxNumSeqs`) and an HPA target from the capped sweep (see `target_for`).
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


def sweep(url: str, scale: dict, steps: list[int], workdir: Path, tag: str) -> list[Step]:
    """One step per concurrency in `steps`; stops one step after TTFT p99 climbs (the load beyond
    it only confirms the climb and costs minutes)."""
    done: list[Step] = []
    # Untimed: the first batches of each size pay one-off costs (kernel set-up per shape), which made
    # the lowest step look slowest in a first try.
    top = max(steps)
    _bench(url, top, 2 * top, scale, seed=1000, out=workdir / f"{tag}-warmup.json")
    for concurrency in steps:
        num = max(scale["min_requests"], scale["per_stream"] * concurrency)
        print(f"[{tag}] concurrency {concurrency}: {num} requests ...", flush=True)
        sampler = Sampler(url)
        sampler.start()
        try:
            summary = _bench(url, concurrency, num, scale, seed=concurrency, out=workdir / f"{tag}-c{concurrency}.json")
        finally:
            sampler.done.set()
            sampler.join()
        step = Step(concurrency, summary, sampler.waiting, sampler.running)
        print("  " + _row(step), flush=True)
        done.append(step)
        found = knee(done)
        if found is not None and found[0] is not step:
            break
    return done


def _row(step: Step) -> str:
    s = step.summary
    return (f"| {step.concurrency} | {s['num_ok']}/{s['num_requests']} | {s['ttft_p50'] * 1000:.0f} "
            f"| {step.ttft_p99 * 1000:.0f} | {s['request_throughput']:.2f} | {s['output_throughput']:.1f} "
            f"| {step.mean(step.waiting):.2f} | {max(step.waiting, default=0):.0f} | {step.mean(step.running):.2f} |")


def chart_defaults() -> tuple[int | None, float]:
    """The chart's default `models[0]` maxNumSeqs (None: the server's own default) and
    autoscaling.targetWaitingPerPod."""
    model = yaml.safe_load(CHART_VALUES.read_text())["models"][0]
    return model.get("maxNumSeqs"), float(model["autoscaling"]["targetWaitingPerPod"])


def knee(steps: list[Step]) -> tuple[Step, float] | None:
    """The first step whose TTFT p99 is above CLIMB_FACTOR x the lowest p99 at a lower concurrency
    (the lowest, not the first: one noisy step must not hide a climb), with that p99; else None."""
    for i, step in enumerate(steps[1:], start=1):
        base = min(s.ttft_p99 for s in steps[:i])
        if step.ttft_p99 > CLIMB_FACTOR * base:
            return step, base
    return None


def table(steps: list[Step]) -> list[str]:
    return ["| concurrency | ok | TTFT p50 (ms) | TTFT p99 (ms) | req/s | output tok/s | waiting mean "
            "| waiting max | running mean |", "|---|---|---|---|---|---|---|---|---|",
            *(_row(s) for s in steps), ""]


def cap_for(steps: list[Step]) -> tuple[Step, int] | None:
    """The knee of an uncapped sweep and the max_num_seqs that puts the queue there: the last
    concurrency before TTFT p99 climbed."""
    found = knee(steps)
    if found is None:
        return None
    climb = found[0]
    before = [s.concurrency for s in steps if s.concurrency < climb.concurrency]
    return climb, max(before)


def target_for(capped: list[Step], climb_concurrency: int) -> float:
    """The HPA target from the capped sweep: half the mean waiting at the concurrency where TTFT
    climbed, at least 1. TTFT starts to rise somewhere between the last flat step (waiting ~0 under
    the cap) and that step; half of its queue puts the scale-out between the two."""
    at = next(s for s in capped if s.concurrency == climb_concurrency)
    return float(max(1, round(at.mean(at.waiting) / 2)))


def report(uncapped: list[Step], capped: list[Step] | None) -> str:
    lines = ["Uncapped (the server's default max_num_seqs 256):", "", *table(uncapped)]
    found = cap_for(uncapped)
    if found is None:
        lines.append(f"TTFT p99 never exceeded {CLIMB_FACTOR:g}x its lowest value at a lower concurrency: "
                     "no knee in this range; no target recommended.")
        return "\n".join(lines)
    climb, cap = found
    base = min(s.ttft_p99 for s in uncapped if s.concurrency < climb.concurrency)
    lines.append(f"TTFT p99 climbs at concurrency {climb.concurrency}: {climb.ttft_p99 * 1000:.0f} ms > "
                 f"{CLIMB_FACTOR:g} x {base * 1000:.0f} ms (the lowest p99 at a lower concurrency). "
                 f"Mean waiting there: {climb.mean(climb.waiting):.2f}: the server runs every request at "
                 "once, so TTFT grows with the batch while the queue stays empty.")
    if not capped:
        return "\n".join(lines)
    lines += ["", f"Capped at `--max-num-seqs {cap}` (the last concurrency before the climb):", "",
              *table(capped)]
    target = target_for(capped, climb.concurrency)
    chart_cap, chart_target = chart_defaults()
    verdict = ("matches" if chart_cap == cap and chart_target == target else
               f"differs from (maxNumSeqs {chart_cap}, targetWaitingPerPod {chart_target:g})")
    lines.append(f"Recommended for this model on this machine: `maxNumSeqs: {cap}` and `targetWaitingPerPod: "
                 f"{target:g}`; this {verdict} the chart's defaults. Under the cap the waiting gauge "
                 f"rises with the load beyond concurrency {cap}, where TTFT climbs, so an HPA on it "
                 "scales out there instead of after the queue is long.")
    return "\n".join(lines)


def measure(scale: dict, serve_args: list[str], steps: list[int], workdir: Path, tag: str) -> list[Step]:
    """Starts one `lmserve serve demo` with `serve_args`, sweeps it, stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / f"{tag}-serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lmserve.cli", "serve", "demo", "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning", *serve_args],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
    try:
        wait_http(url + "/ready", timeout=900, proc=proc)
        deadline = time.monotonic() + 300
        while httpx.get(url + "/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became ready")
            time.sleep(0.5)
        return sweep(url, scale, steps, workdir, tag)
    except BaseException:
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        stop_group(proc, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="Extra `lmserve serve` argument (repeatable), e.g. --serve-arg=--attention-backend=torch.")
    parser.add_argument("--write", action="store_true", help="Write the hpa_target section of RESULTS.md.")
    args = parser.parse_args()
    scale = SCALES[args.scale]
    with tempfile.TemporaryDirectory(prefix="lmserve-hpa-") as tmp:
        workdir = Path(tmp)
        uncapped = measure(scale, args.serve_arg, scale["steps"], workdir, "uncapped")
        found = cap_for(uncapped)
        capped = None
        if found is not None:
            climb, cap = found
            steps = [c for c in scale["steps"] if c >= cap]
            steps = steps[:steps.index(climb.concurrency) + 2]
            capped = measure(scale, [*args.serve_arg, "--max-num-seqs", str(cap)], steps, workdir, "capped")
    command = "PYTHONPATH=. .venv/bin/python benchmarks/hpa_target.py " + " ".join(sys.argv[1:])
    body = "\n".join([f"`{command}`", "", f"scale `{args.scale}`: `lmserve serve demo`, `lmserve bench` "
                      f"with input {scale['input_len']} / output {scale['output_len']} tokens per step; "
                      f"`{METRIC}` sampled every 0.25 s. A sweep stops one step after TTFT p99 climbs.", "",
                      report(uncapped, capped)])
    print("\n" + body)
    if args.write:
        write_section("hpa_target", "## HPA target: where TTFT climbs (issue 15)\n\n" + body)


if __name__ == "__main__":
    main()
