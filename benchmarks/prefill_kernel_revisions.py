"""The CPU prefill attention kernel of a git revision against the working tree's, turn by turn.

    .venv/bin/python benchmarks/prefill_kernel_revisions.py HEAD~1

Builds `lmserve/engine/csrc` as it is at REV (`git show`, into a temp dir) and as it is now, as two
extension modules in this process, and times `paged_prefill_attention` on W1's 128 prompts with
bench-llama-55m's attention shape (8 query heads, 2 KV heads, head size 64, float32): whole
prompts, packed into calls of at most 4096 tokens like the engine's steps, blocks in a random
order. One layer's worth; `--repeats` alternating runs after one untimed run each. Prints the
largest difference between the two outputs, then per build the minimum and median milliseconds
and GFLOP/s (causal attention FLOPs: 4 * heads * head_dim per query-key pair). Writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.engine_throughput import make_workloads  # noqa: E402
from lmserve.engine import kernels  # noqa: E402
from lmserve.engine.attention.base import SequenceSlice  # noqa: E402
from lmserve.engine.attention.torch_backend import block_tables  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 64, 16
STEP_TOKENS = 4096
REPO = Path(__file__).resolve().parent.parent
CSRC = kernels.CSRC.relative_to(REPO).as_posix()  # as git names it


def sources_at(rev: str, out_dir: Path) -> None:
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{CSRC}"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "show", f"{rev}:{CSRC}/{name}"], cwd=REPO, check=True,
                              capture_output=True).stdout
        (out_dir / name).write_bytes(text)


def make_calls(lengths: list[int]) -> tuple[torch.Tensor, list[tuple]]:
    """The cache and, per call, (query, layout, block tables, out) for whole prompts."""
    torch.manual_seed(0)
    steps: list[list[int]] = [[]]
    for n in lengths:
        if sum(steps[-1]) + n > STEP_TOKENS:
            steps.append([])
        steps[-1].append(n)
    num_blocks = sum(-(-n // BLOCK) for n in lengths)
    cache = torch.randn(2, KV_HEADS, num_blocks, BLOCK * HEAD_DIM)
    order = torch.randperm(num_blocks).tolist()
    calls, used = [], 0
    for step in steps:
        tokens = sum(step)
        # Query rows strided like the engine's view into its fused q/k/v projection.
        query = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM)[:, :HEADS]
        slices, start = [], 0
        for n in step:
            blocks = order[used : used + -(-n // BLOCK)]
            used += len(blocks)
            slices.append(SequenceSlice(start, n, n, blocks))
            start += n
        layout = torch.tensor([(s.query_start, s.query_len, s.context_len) for s in slices])
        calls.append((query, layout, block_tables(slices), torch.empty(tokens, HEADS * HEAD_DIM)))
    return cache, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the git revision to compare the working tree with")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sources_at(args.rev, Path(tmp))
        builds = {args.rev: kernels.compile_kernels(Path(tmp), "prefill_ab_rev"),
                  "working tree": kernels.compile_kernels(kernels.CSRC, "prefill_ab_now")}
    lengths = [len(p) for p in make_workloads(False, 128)["w1"]["prompts"]]
    cache, calls = make_calls(lengths)
    flops = sum(4 * HEADS * HEAD_DIM * n * (n + 1) / 2 for n in lengths)
    scale = HEAD_DIM**-0.5

    def run(module: ModuleType) -> float:
        start = time.perf_counter()
        for query, layout, tables, out in calls:
            module.paged_prefill_attention(query, cache, layout, tables, scale, 0, out)
        return time.perf_counter() - start

    outputs = []
    for module in builds.values():
        run(module)
        outputs.append(torch.cat([out.clone() for *_, out in calls]))
    print(f"largest difference between the outputs: {(outputs[0] - outputs[1]).abs().max().item():.3g}")
    seconds: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(args.repeats):
        for name, module in builds.items():
            seconds[name].append(run(module))
    for name, runs in seconds.items():
        print(f"  {name:>12}: min {min(runs) * 1e3:.1f} ms, median {statistics.median(runs) * 1e3:.1f} ms, "
              f"{flops / min(runs) / 1e9:.0f} GFLOP/s at the minimum")


if __name__ == "__main__":
    main()
