"""The CPU prefill attention kernel against PyTorch's SDPA per slice, in one engine, turn by turn.

    .venv/bin/python benchmarks/prefill_kernel_ab.py                          # all of W1
    .venv/bin/python benchmarks/prefill_kernel_ab.py --requests 48 --max-tokens 1   # prompts only

One `lmserve.LLM` (engine_throughput.py's model and settings, `--lmserve-llm` to change them) runs the chosen part of W1
`--repeats` times with each prefill path, alternating, after an untimed warm-up: on this noisy VM
two runs minutes apart differ by more than the change, runs side by side in one process do not.
Prints the seconds of every run, the minimum and the median per path. Writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_throughput import (  # noqa: E402
    add_engine_config_args,
    ensure_model,
    lmserve_settings,
    make_workloads,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128, help="the first N requests of W1")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap every output (1: prompts only)")
    parser.add_argument("--repeats", type=int, default=8)
    add_engine_config_args(parser)
    args = parser.parse_args()

    import lmserve
    from lmserve.engine.attention.cpu_backend import CPUAttentionBackend
    from lmserve.engine.attention.torch_backend import TorchAttentionBackend

    model_dir = ensure_model()
    w1 = make_workloads(False, args.requests, args.max_tokens)["w1"]
    prompts, output_lens = w1["prompts"], w1["output_lens"]
    llm = lmserve.LLM(model=str(model_dir), **lmserve_settings(args))

    def params() -> list:
        return [lmserve.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]

    llm.generate(prompts[:16], params()[:16], use_tqdm=False)
    paths = {"kernel": CPUAttentionBackend._prefills, "sdpa per slice": TorchAttentionBackend._prefills}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, method in paths.items():
            CPUAttentionBackend._prefills = method  # type: ignore[method-assign]
            start = time.perf_counter()
            llm.generate(prompts, params(), use_tqdm=False)
            seconds[name].append(time.perf_counter() - start)
    print(f"W1 first {len(prompts)} requests, {sum(output_lens)} output tokens, {args.repeats} runs per path:")
    for name, runs in seconds.items():
        print(f"  {name:>15}: min {min(runs):.2f} s, median {statistics.median(runs):.2f} s "
              f"({' '.join(f'{s:.2f}' for s in runs)})")


if __name__ == "__main__":
    main()
