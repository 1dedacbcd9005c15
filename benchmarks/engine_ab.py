"""Two ways of running one engine step, in one engine, turn by turn, on W1.

    .venv/bin/python benchmarks/engine_ab.py prefill-kernel                           # all of W1
    .venv/bin/python benchmarks/engine_ab.py prefill-kernel --requests 48 --max-tokens 1   # prompts only
    .venv/bin/python benchmarks/engine_ab.py output-rows --requests 48 --max-tokens 1

Comparisons:
- `prefill-kernel`: the CPU prefill attention kernel against PyTorch's SDPA per slice.
- `output-rows`: the last layer carrying on past attention with the sampled rows only (what the
  engine does) against every row (as before).

One `lmserve.LLM` (engine_throughput.py's model and settings, `--lmserve-llm` to change them) runs the chosen part of W1
`--repeats` times each way, alternating, after an untimed warm-up: on this noisy VM two runs
minutes apart differ by more than the change, runs side by side in one process do not. Prints the
seconds of every run, the minimum and the median per way, and whether both ways generated the
same tokens. Writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_throughput import (  # noqa: E402
    add_engine_config_args,
    ensure_model,
    lmserve_settings,
    make_workloads,
)


def prefill_kernel_ways() -> dict[str, Callable[[], None]]:
    from lmserve.engine.attention.cpu_backend import CPUAttentionBackend
    from lmserve.engine.attention.torch_backend import TorchAttentionBackend

    kernel, sdpa = CPUAttentionBackend._prefills, TorchAttentionBackend._prefills

    def use(method: Callable) -> Callable[[], None]:
        return lambda: setattr(CPUAttentionBackend, "_prefills", method)

    return {"kernel": use(kernel), "sdpa per slice": use(sdpa)}


def output_rows_ways() -> dict[str, Callable[[], None]]:
    from lmserve.engine.runner import ModelRunner

    prepare = ModelRunner._prepare

    def every_row(self, ordered):  # type: ignore[no-untyped-def]
        inputs = prepare(self, ordered)
        inputs.ctx.output_rows = None
        return inputs

    def use(method: Callable) -> Callable[[], None]:
        return lambda: setattr(ModelRunner, "_prepare", method)

    return {"sampled rows": use(prepare), "every row": use(every_row)}


COMPARISONS = {"prefill-kernel": prefill_kernel_ways, "output-rows": output_rows_ways}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    parser.add_argument("--requests", type=int, default=128, help="the first N requests of W1")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap every output (1: prompts only)")
    parser.add_argument("--repeats", type=int, default=8)
    add_engine_config_args(parser)
    args = parser.parse_args()

    import lmserve

    model_dir = ensure_model()
    w1 = make_workloads(False, args.requests, args.max_tokens)["w1"]
    prompts, output_lens = w1["prompts"], w1["output_lens"]
    llm = lmserve.LLM(model=str(model_dir), **lmserve_settings(args))

    def params() -> list:
        return [lmserve.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]

    llm.generate(prompts[:16], params()[:16], use_tqdm=False)
    ways = COMPARISONS[args.comparison]()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, use in ways.items():
            use()
            start = time.perf_counter()
            outputs = llm.generate(prompts, params(), use_tqdm=False)
            seconds[name].append(time.perf_counter() - start)
            tokens[name] = [list(out.outputs[0].token_ids) for out in outputs]
    same = len({repr(t) for t in tokens.values()}) == 1
    print(f"W1 first {len(prompts)} requests, {sum(output_lens)} output tokens, {args.repeats} runs each way; "
          f"same tokens both ways: {'yes' if same else 'NO'}")
    for name, runs in seconds.items():
        print(f"  {name:>15}: min {min(runs):.2f} s, median {statistics.median(runs):.2f} s "
              f"({' '.join(f'{s:.2f}' for s in runs)})")


if __name__ == "__main__":
    main()
