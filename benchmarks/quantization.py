"""Quality of each precision: held-out perplexity and greedy agreement with float32 (issue 16).

    PYTHONPATH=. .venv/bin/python benchmarks/quantization.py           # writes the `quantization` section
    PYTHONPATH=. .venv/bin/python benchmarks/quantization.py --quick   # a fraction of the data, prints only

For each model and precision (float32, bfloat16, int8, int4 at group 128 and 32, and a GPTQ-format
checkpoint written here from the same weights, loaded through the GPTQ path):
- weights: bytes as loaded, and the KV blocks (16 tokens, float32 KV) the bytes saved would hold;
- perplexity per token on held-out text: the text as `<s> document </s>` token streams, cut into
  consecutive windows of the model's context (each window predicts all but its first token),
  computed through lmserve's own model and attention (torch backend);
- greedy agreement with float32: prompts generated greedily (ignore_eos) by lmserve's engine;
  agreement = output tokens before the first that differs from float32's / all output tokens,
  identical = outputs equal to float32's from first to last token.

Models: the demo model (its `heldout.jsonl` ships in the package; prompts are 32 held-out
documents' first 64-256 tokens, 64 output tokens each) and bench-llama-55m (random weights, built
as benchmarks/overload.py builds it; "held-out text" is W1's random prompts, so its perplexity is
near the vocabulary size and only its change between precisions means anything; prompts: the
first 32 requests of W1, outputs capped at 64 tokens). The GPTQ checkpoint is round-to-nearest
integers packed in GPTQ's format (no GPTQ error correction): it checks the load path end to end,
not GPTQ's quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.engine_throughput import make_requests  # noqa: E402
from benchmarks.overload import ensure_model  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from lmserve import LLM, SamplingParams  # noqa: E402
from lmserve.engine.attention import ForwardContext, SequenceSlice, make_backend  # noqa: E402
from lmserve.engine.config import ModelConfig  # noqa: E402
from lmserve.engine.loader import LoadedModel, demo_model_dir, load_model  # noqa: E402
from lmserve.engine.quantization import quantize_int4  # noqa: E402

PRECISIONS: dict[str, dict[str, Any]] = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int4 g128": {"quantization": "int4", "quantization_group_size": 128},
    "int4 g32": {"quantization": "int4", "quantization_group_size": 32},
    "gptq g128 (RTN-packed)": {"quantization": "gptq"},
}
BLOCK_SIZE = 16


@dataclass
class Workload:
    name: str
    path: Path
    heldout_ids: list[int]
    context: int
    prompts: list[list[int]]
    max_tokens: int


def demo_workload(quick: bool) -> Workload:
    from lmserve.engine.tokenizer import Tokenizer

    path = demo_model_dir()
    tokenizer = Tokenizer.from_pretrained(path)
    bos, eos = tokenizer.encode("<s>", add_special_tokens=False), tokenizer.encode("</s>", add_special_tokens=False)
    documents = []
    for line in (path / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["kind"] == "chapter":
            documents.append(f"{record['book']} {record['chapter']}\n" + "\n".join(record["verses"]))
        elif record["kind"] == "fortune":
            documents.append(record["text"])
    streams = [bos + tokenizer.encode(d, add_special_tokens=False) + eos for d in documents]
    heldout = [t for s in streams for t in s]
    rng = np.random.default_rng(0)
    long_docs = [s for s in streams if len(s) > 256]
    picks = rng.choice(len(long_docs), size=min(32, len(long_docs)), replace=False)
    prompts = [long_docs[i][: int(rng.integers(64, 257))] for i in picks]
    if quick:
        heldout, prompts = heldout[: len(heldout) // 10], prompts[:8]
    return Workload("lmserve-demo", path, heldout, 512, prompts, 64)


def bench_llama_workload(quick: bool) -> Workload:
    prompts, _ = make_requests(seed=0, num_requests=32)
    heldout = [t for p in make_requests(seed=3, num_requests=64)[0] for t in p]
    if quick:
        heldout, prompts = heldout[:4096], prompts[:8]
    return Workload("bench-llama-55m", ensure_model(), heldout, 512, prompts, 64)


def window_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one window, computed as one prefill through lmserve's model."""
    model = loaded.model
    n = len(ids)
    num_blocks = -(-n // BLOCK_SIZE)
    backend = make_backend("torch", loaded.device, BLOCK_SIZE)
    caches = backend.allocate_cache(model.num_layers, num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                                    loaded.dtype, loaded.device)
    meta = backend.build_metadata([SequenceSlice(0, n, n, list(range(num_blocks)))], torch.arange(n), loaded.device)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), ForwardContext(backend, meta, caches))
        return model.compute_logits(hidden)


def perplexity(loaded: LoadedModel, ids: list[int], context: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, context):
        window = ids[start : start + context]
        if len(window) < 2:
            break
        logits = window_logits(loaded, window)
        targets = torch.tensor(window[1:])
        total += float(torch.nn.functional.cross_entropy(logits[:-1].float(), targets, reduction="sum"))
        count += len(window) - 1
    return float(np.exp(total / count))


def greedy_outputs(path: Path, settings: dict[str, Any], work: Workload) -> list[list[int]]:
    llm = LLM(str(path), attention_backend="torch", num_blocks=len(work.prompts) * 40, **settings)
    params = SamplingParams(max_tokens=work.max_tokens, temperature=0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(work.prompts, params, use_tqdm=False)]


def agreement(reference: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(tokens before the first difference / all tokens, share of identical outputs)."""
    matched = total = identical = 0
    for a, b in zip(reference, got):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        matched, total, identical = matched + first, total + len(a), identical + (a == b)
    return matched / total, identical / len(reference)


def write_gptq_checkpoint(src: Path, dst: Path, group_size: int = 128) -> Path:
    """`src` with every decoder projection rounded to int4 and packed as GPTQ (original format)."""
    import shutil

    from safetensors.torch import load_file, save_file

    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)

    def pack_words(values: torch.Tensor) -> torch.Tensor:  # [..., 8] of 4-bit -> int32 words
        words = (values.to(torch.int64) << shifts).sum(dim=-1)
        return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        prefix, _, kind = name.rpartition(".")
        if kind != "weight" or prefix.rsplit(".", 1)[-1] not in projections:
            tensors[name] = tensor
            continue
        ints = quantize_int4(tensor.float(), group_size)
        n, k = ints.q.shape
        tensors[f"{prefix}.qweight"] = pack_words(ints.q.t().reshape(k // 8, 8, n).transpose(1, 2))
        tensors[f"{prefix}.qzeros"] = pack_words((ints.zeros.t().to(torch.int64) - 1).reshape(-1, n // 8, 8))
        tensors[f"{prefix}.scales"] = ints.scales.t().half().contiguous()
        tensors[f"{prefix}.g_idx"] = torch.arange(k, dtype=torch.int32) // group_size
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                     "desc_act": False, "sym": False, "checkpoint_format": "gptq"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def measure(work: Workload, gptq_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    reference: list[list[int]] = []
    for label, settings in PRECISIONS.items():
        path = gptq_dir if settings.get("quantization") == "gptq" else work.path
        started = time.perf_counter()
        loaded = load_model(ModelConfig(model=str(path), **settings))
        model = loaded.model
        block_bytes = 2 * model.num_layers * BLOCK_SIZE * model.num_kv_heads * model.head_dim * 4
        ppl = perplexity(loaded, work.heldout_ids, work.context)
        num_bytes = loaded.weight_bytes
        del loaded, model
        outputs = greedy_outputs(path, settings, work)
        reference = reference or outputs
        agree, identical = agreement(reference, outputs)
        rows.append({"precision": label, "weight_bytes": num_bytes, "ppl": ppl, "agreement": agree,
                     "identical": identical, "seconds": time.perf_counter() - started,
                     "blocks_gained": ((rows[0]["weight_bytes"] if rows else num_bytes) - num_bytes) // block_bytes})
        print(f"[{work.name}] {label}: {num_bytes / 2**20:.1f} MiB, perplexity {ppl:.3f}, "
              f"agreement {agree:.1%}, identical {identical:.1%} ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def table(work: Workload, rows: list[dict[str, Any]]) -> str:
    base = rows[0]["ppl"]
    lines = [f"**{work.name}**: {len(work.heldout_ids)} held-out tokens in windows of {work.context}; "
             f"{len(work.prompts)} greedy prompts x {work.max_tokens} output tokens.", "",
             "| precision | weights | KV blocks freed | perplexity | vs float32 | greedy agreement | identical outputs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['weight_bytes'] / 2**20:.1f} MiB | {r['blocks_gained']} | "
                     f"{r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f} % | {r['agreement']:.1%} | "
                     f"{r['identical']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the held-out text, 8 prompts; prints only")
    parser.add_argument("--models", default="demo,bench-llama-55m", help="comma-separated: demo, bench-llama-55m")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    builders = {"demo": demo_workload, "bench-llama-55m": bench_llama_workload}
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            work = builders[name](args.quick)
            gptq_dir = write_gptq_checkpoint(work.path, Path(tmp) / f"{name}-gptq")
            sections.append(table(work, measure(work, gptq_dir)))
    body = "\n\n".join(sections)
    print(body)
    if not args.quick:
        command = "PYTHONPATH=. .venv/bin/python benchmarks/quantization.py"
        intro = (f"`{command}` — weight-only quantization at load (issue 16), {torch.get_num_threads()} torch "
                 "threads; how each figure is measured: the script's docstring.\n\n")
        write_section("quantization", intro + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
