"""The timing protocol every engine runner follows, so that the three engines are measured alike.

Standard library only: each runner imports it from its own venv. A runner script defines an engine
(anything with `generate(prompts, output_lens) -> token ids`) and calls `run(make_engine)`, which:

1. reads the spec JSON (argv[1]) written by `engine_throughput.py`;
2. loads the engine (timed apart, not part of any figure);
3. warm-up, untimed: the spec's warm-up requests (the first W1 requests, few output tokens each),
   then one W0-shaped request with 1 output token;
4. W1: every request in one `generate` call, timed `w1_repeats` times;
5. W0: time to first token = wall time of a `generate` of the W0 prompt with 1 output token
   (the engines here are offline, so TTFT is measured the same way for all); then the full
   request (W0 output_len tokens); decode tokens/s = (output_len - 1) / (full - TTFT), from the
   medians of `w0_repeats` runs each;
6. writes the result JSON (argv[2]): timings, token ids of the last W1 and W0 runs, versions, and
   how much CPU other processes on the machine used during the timed part (a shared machine's noise).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

TokenIds = list[int]


class Engine(Protocol):
    def generate(self, prompts: Sequence[TokenIds], output_lens: Sequence[int]) -> list[TokenIds]:
        """Greedy, EOS ignored, exactly output_lens[i] new tokens for prompt i; results in input order."""
        ...


def _timed(
    engine: Engine, prompts: Sequence[TokenIds], output_lens: Sequence[int]
) -> tuple[float, list[TokenIds]]:
    start = time.perf_counter()
    outputs = engine.generate(prompts, output_lens)
    seconds = time.perf_counter() - start
    for i, (tokens, n) in enumerate(zip(outputs, output_lens, strict=True)):
        if len(tokens) != n:
            raise RuntimeError(f"request {i}: engine returned {len(tokens)} tokens, asked for {n}")
    return seconds, outputs


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def _tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds used by a live process tree (engines such as vLLM start their own processes)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [root_pid]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack += children.get(pid, [])
    return total


class CpuMeter:
    """Wall time, this process tree's CPU time, and everyone else's, over the timed part of a run."""

    def __init__(self) -> None:
        self.wall, self.busy, self.ours = (
            time.perf_counter(),
            _busy_cpu_seconds(),
            _tree_cpu_seconds(os.getpid()),
        )

    def read(self) -> dict[str, float]:
        ours = _tree_cpu_seconds(os.getpid()) - self.ours
        busy = _busy_cpu_seconds() - self.busy
        return {
            "wall_seconds": time.perf_counter() - self.wall,
            "cpu_seconds": ours,
            "other_cpu_seconds": max(0.0, busy - ours),
        }


def measure(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs warm-up, W1 and W0 on a loaded engine and returns the timings and token ids."""
    warmup, w1, w0 = spec["warmup"], spec["w1"], spec["w0"]
    warmup_start = time.perf_counter()
    _timed(engine, warmup["prompts"], warmup["output_lens"])
    _timed(engine, [w0["prompt"]], [1])
    warmup_seconds = time.perf_counter() - warmup_start

    meter = CpuMeter()
    w1_seconds: list[float] = []
    for _ in range(spec["w1_repeats"]):
        seconds, w1_tokens = _timed(engine, w1["prompts"], w1["output_lens"])
        w1_seconds.append(seconds)
        print(f"  W1: {seconds:.2f} s", file=sys.stderr, flush=True)

    ttft_seconds = [_timed(engine, [w0["prompt"]], [1])[0] for _ in range(spec["w0_repeats"])]
    full_seconds: list[float] = []
    for _ in range(spec["w0_repeats"]):
        seconds, (w0_tokens,) = _timed(engine, [w0["prompt"]], [w0["output_len"]])
        full_seconds.append(seconds)
    return {
        "warmup_seconds": warmup_seconds,
        "timed_cpu": meter.read(),
        "w1": {"seconds": w1_seconds, "token_ids": w1_tokens},
        "w0": {"ttft_seconds": ttft_seconds, "full_seconds": full_seconds, "token_ids": w0_tokens},
    }


def summarize(raw: dict[str, Any], spec: dict[str, Any]) -> dict[str, float]:
    """Throughput figures from the medians of the runs."""
    w1, w0 = spec["w1"], spec["w0"]
    num_output = sum(w1["output_lens"])
    num_prompt = sum(len(p) for p in w1["prompts"])
    w1_seconds = statistics.median(raw["w1"]["seconds"])
    ttft = statistics.median(raw["w0"]["ttft_seconds"])
    full = statistics.median(raw["w0"]["full_seconds"])
    return {
        "w1_seconds": w1_seconds,
        "w1_output_tokens_per_s": num_output / w1_seconds,
        "w1_total_tokens_per_s": (num_prompt + num_output) / w1_seconds,
        "w0_ttft_seconds": ttft,
        "w0_full_seconds": full,
        "w0_decode_tokens_per_s": (w0["output_len"] - 1) / (full - ttft),
    }


def run(make_engine: Callable[[str, dict[str, Any]], tuple[Engine, dict[str, Any]]]) -> None:
    """Entry point of a runner: `python RUNNER spec.json result.json`.

    `make_engine(model_dir, engine_config)` returns the engine and a dict of facts to record
    (versions, the configuration it actually used).
    """
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    load_start = time.perf_counter()
    engine, facts = make_engine(spec["model_dir"], spec["engine_config"])
    load_seconds = time.perf_counter() - load_start
    print(f"  loaded in {load_seconds:.1f} s", file=sys.stderr, flush=True)
    raw = measure(engine, spec)
    result = {
        "facts": facts,
        "load_seconds": load_seconds,
        "pid": os.getpid(),
        **raw,
        "summary": summarize(raw, spec),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
