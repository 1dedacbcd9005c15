"""Where lmserve's engine spends W1: wall time per part of the forward pass (issue 2's profile).

    .venv/bin/python benchmarks/engine_profile.py              # W1, 128 requests
    .venv/bin/python benchmarks/engine_profile.py --requests 32

Runs W1 (engine_throughput.py's workload and model, the same LLM settings) once, after an
untimed warm-up, with timers around the engine's parts: every linear layer (the matrix multiplies, output head included), decode attention, prefill
attention, KV writes, and the rest. Timers add a little overhead of their own, so the total runs
slightly slower than engine_throughput.py reports; read the shares, not the absolute seconds.
The matrix multiplies' rate is set beside what oneDNN reaches on the same shapes alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_throughput import (  # noqa: E402
    add_engine_config_args,
    ensure_model,
    lmserve_settings,
    make_workloads,
)


def timed(totals: dict[str, float], key: str, cls: type, name: str) -> None:
    """Wraps cls.name so that its wall time is added to totals[key]."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(cls, name, wrapper)


def linear_flops(model_dir: Path, prompt_tokens: int, output_tokens: int) -> float:
    """Matrix-multiply FLOPs of W1: every prompt token through the layers, every generated token
    through the layers and the output head (the last prompt token's head is counted with the
    first generated token)."""
    config = json.loads((model_dir / "config.json").read_text())
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i
    layers = per_layer * config["num_hidden_layers"]
    return 2.0 * (layers * (prompt_tokens + output_tokens) + h * v * output_tokens)


def onednn_rate(shapes: list[tuple[int, int, int]]) -> float:
    """GFLOP/s of prepacked oneDNN linears alone on the model's shapes."""
    from lmserve.engine.linear import PackedLinear

    flops = seconds = 0.0
    for m, k, n in shapes:
        layer = PackedLinear(torch.nn.Linear(k, n, bias=False))
        x = torch.randn(m, k)
        layer(x)
        start = time.perf_counter()
        for _ in range(5):
            layer(x)
        seconds += time.perf_counter() - start
        flops += 5 * 2.0 * m * k * n
    return flops / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128, help="W1 requests to run (default all 128)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="cap every output at N tokens (1: the prefill of a burst only)")
    add_engine_config_args(parser)
    args = parser.parse_args()

    from lmserve import LLM, SamplingParams
    from lmserve.engine.attention.cpu_backend import CPUAttentionBackend
    from lmserve.engine.linear import PackedLinear
    from lmserve.engine.models.llama import LlamaForCausalLM

    model_dir = ensure_model()
    w1 = make_workloads(False, args.requests, args.max_tokens)["w1"]
    prompts, output_lens = w1["prompts"], w1["output_lens"]
    llm = LLM(model=str(model_dir), **lmserve_settings(args))
    warm = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 8
    llm.generate(prompts[:8], warm, use_tqdm=False)

    totals: dict[str, float] = defaultdict(float)
    timed(totals, "linear layers (matrix multiplies)", PackedLinear, "forward")
    timed(totals, "decode attention", CPUAttentionBackend, "_decode")
    timed(totals, "prefill attention", CPUAttentionBackend, "_prefills")
    timed(totals, "KV cache writes", CPUAttentionBackend, "_write")
    timed(totals, "model forward", LlamaForCausalLM, "forward")
    timed(totals, "model forward", LlamaForCausalLM, "compute_logits")
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start

    inside = totals.pop("model forward")
    parts = dict(totals)
    parts["rest of the forward (norms, rotary, activation, embedding)"] = inside - sum(totals.values())
    parts["outside the forward (scheduler, inputs, sampler, outputs)"] = total - inside
    print(f"W1, {len(prompts)} requests: {total:.2f} s, {sum(output_lens) / total:.1f} output tok/s (with timers)")
    for name, seconds in parts.items():
        print(f"  {name:<62} {seconds:6.2f} s  {seconds / total:6.1%}")
    flops = linear_flops(model_dir, sum(len(p) for p in prompts), sum(output_lens))
    linear_seconds = totals["linear layers (matrix multiplies)"]
    config = json.loads((model_dir / "config.json").read_text())
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = [(m, h, n) for m in (128, 4096) for n in (h + 2 * kv, h, 2 * i)] + [(m, i, h) for m in (128, 4096)]
    shapes.append((128, h, v))
    print(f"  matrix multiplies: {flops / 1e12:.2f} TFLOP in {linear_seconds:.2f} s = "
          f"{flops / linear_seconds / 1e9:.0f} GFLOP/s; oneDNN alone on these shapes: {onednn_rate(shapes):.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
