"""Train `lmserve-demo`, the small model that ships inside the package (lmserve/demo_model/).

    python tools/train_demo_model.py                 # full run: ~30 minutes on 2 CPU cores
    python tools/train_demo_model.py --tiny --max-steps 3 --corpus lmserve/demo_model/heldout.jsonl --out /tmp/m

It downloads public-domain English text from Debian packages (tools/demo_corpus.py), trains a
byte-level BPE tokenizer with `tokenizers`, trains a Llama-architecture model with `transformers`
on the CPU (plain documents plus chat-shaped examples, tools/demo_chat.py), measures perplexity on a
held-out split, and writes a standard Hugging Face model directory. Seeded: the same command on the
same machine (same torch build and thread count) writes the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (`python tools/train_demo_model.py`): make `tools` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tools import demo_card, demo_chat
from tools.demo_corpus import HELDOUT_EVERY, Corpus, fetch_corpus

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "lmserve" / "demo_model"
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "demo_model"

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_TOKENS  # ids 0..5, in this order
# Defaults for engines that take them from generation_config.json (vLLM does): greedy decoding of
# a model this small repeats itself; mild sampling reads better.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('lmserve-demo knows the roles system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the corpus)."""

    seed: int = 1234
    vocab_size: int = 4096
    """BPE vocabulary, special tokens and the 256 byte tokens included."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 640
    context_length: int = 512
    batch_size: int = 8
    """Rows of `context_length` tokens per optimizer step."""
    max_steps: int = 800
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    num_verse_examples: int = 6000
    """Chat examples answered with Bible verses per pass over the data (fortunes give one each)."""
    eval_every: int = 200
    """Measure held-out perplexity every this many steps (0: only at the end)."""
    num_processes: int = 2
    threads_per_process: int = 1
    storage_dtype: str = "bfloat16"


TINY = TrainConfig(
    vocab_size=320, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
    context_length=128, batch_size=4, max_steps=3, warmup_steps=1, num_verse_examples=20, eval_every=0,
    num_processes=1,
)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization); a single encoded text starts with <s>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, special_id(tokenizer, BOS))],
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, config: TrainConfig, out_dir: Path) -> PreTrainedTokenizerFast:
    """Writes tokenizer.json and a tokenizer_config.json that transformers 4.x and 5.x both read
    (written by hand: transformers 5 would name its own backend class and move the template out)."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
        "model_max_length": config.context_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))


def model_config(config: TrainConfig, tokenizer: Tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.context_length,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=special_id(tokenizer, PAD),
        bos_token_id=special_id(tokenizer, BOS),
        eos_token_id=special_id(tokenizer, EOS),
    )


def special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token")
    return token_id


def document_ids(tokenizer: Tokenizer, documents: list[str]) -> list[list[int]]:
    """`<s> document </s>` token ids for each document."""
    bos, eos = special_id(tokenizer, BOS), special_id(tokenizer, EOS)
    encodings = tokenizer.encode_batch(documents, add_special_tokens=False)
    return [[bos, *e.ids, eos] for e in encodings]


def training_rows(
    corpus: Corpus, tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerFast, config: TrainConfig,
) -> Iterator[list[int]]:
    """Endless rows of `context_length` tokens: each pass over the data shuffles the plain documents
    with freshly drawn chat examples, concatenates them and cuts the stream into rows."""
    plain = document_ids(tokenizer, corpus.documents())
    for epoch in range(sys.maxsize):
        rng = random.Random(config.seed * 1000 + epoch)
        chats = demo_chat.conversations(corpus, rng, config.num_verse_examples)
        rendered = [hf_tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
        chat_ids = [e.ids for e in tokenizer.encode_batch(rendered, add_special_tokens=False)]
        items = plain + chat_ids
        rng.shuffle(items)
        stream = [token for item in items for token in item]
        for start in range(0, len(stream) - config.context_length + 1, config.context_length):
            yield stream[start : start + config.context_length]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_learning_rate` at `max_steps`."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, token_ids: list[int], context_length: int) -> tuple[float, int]:
    """(sum of negative log-likelihoods in nats, number of predicted tokens) of a token stream, cut
    into consecutive windows of `context_length` (each window predicts all but its first token)."""
    model.eval()
    total_nll, num_predicted = 0.0, 0
    for start in range(0, len(token_ids) - 1, context_length):
        window = torch.tensor([token_ids[start : start + context_length]])
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total_nll += nll.item()
        num_predicted += window.shape[1] - 1
    model.train()
    return total_nll, num_predicted



@dataclass
class TrainJob:
    """What each training process needs; picklable, so `torch.multiprocessing.spawn` can pass it."""

    config: TrainConfig
    corpus: Corpus
    """The training split."""
    tokenizer_dir: Path
    heldout_ids: list[int]
    result_path: Path
    """Where the first process leaves the trained float32 state dict and the loss log."""
    port: int


def run_training(job: TrainJob) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], float]:
    """Trains in `config.num_processes` processes; returns (state dict, loss log, CPU seconds that
    the first process spent in the training loop).

    Data parallel over processes of one thread each rather than one process of many threads: on a
    machine shared with other work, threads of one process wait for each other at every operation,
    processes only once a step."""
    if job.config.num_processes == 1:
        train_worker(0, job)
    else:
        torch.multiprocessing.spawn(train_worker, args=(job,), nprocs=job.config.num_processes)
    result = torch.load(job.result_path, weights_only=True)
    job.result_path.unlink()
    return result["state_dict"], result["log"], result["cpu_seconds"]


def train_worker(rank: int, job: TrainJob) -> None:
    """One training process: every process draws the same rows and trains on its share of each
    batch; gradients are averaged, so the result is that of one process taking whole batches."""
    config = job.config
    world_size = config.num_processes
    torch.set_num_threads(config.threads_per_process)
    torch.use_deterministic_algorithms(True)
    if world_size > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{job.port}", rank=rank, world_size=world_size,
        )
    torch.manual_seed(config.seed)
    tokenizer = Tokenizer.from_file(str(job.tokenizer_dir / "tokenizer.json"))
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(job.tokenizer_dir))
    model = LlamaForCausalLM(model_config(config, tokenizer))
    trained = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    rows = training_rows(job.corpus, tokenizer, hf_tokenizer, config)

    def evaluate() -> float:
        nll, count = heldout_loss(model, job.heldout_ids, config.context_length)
        return math.exp(nll / count)

    cpu_started = time.process_time()
    log = train(trained, rows, config, evaluate if rank == 0 else None, rank)
    if rank == 0:
        cpu_seconds = time.process_time() - cpu_started
        torch.save({"state_dict": model.state_dict(), "log": log, "cpu_seconds": cpu_seconds}, job.result_path)
    if world_size > 1:
        torch.distributed.destroy_process_group()


def train(model: torch.nn.Module, rows: Iterator[list[int]], config: TrainConfig,
          evaluate: Callable[[], float] | None, rank: int) -> list[dict[str, float]]:
    """AdamW with bfloat16 autocast (the weights stay float32); returns the loss log."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8,
    )
    log: list[dict[str, float]] = []
    progress = tqdm(range(config.max_steps), desc="training", unit="step", mininterval=5.0,
                    file=sys.stdout, disable=rank != 0)
    started = time.perf_counter()
    model.train()
    for step in progress:
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows_of_step = [next(rows) for _ in range(config.batch_size)]
        batch = torch.tensor(rows_of_step[rank :: config.num_processes])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_per_second = (step + 1) * config.batch_size * config.context_length / (time.perf_counter() - started)
        progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_second:.0f}")
        log.append({"step": step + 1, "loss": round(loss.item(), 4), "lr": lr})
        is_last = step + 1 == config.max_steps
        if evaluate is not None and config.eval_every and (step + 1) % config.eval_every == 0 and not is_last:
            log[-1]["heldout_perplexity"] = round(evaluate(), 3)
            progress.write(f"step {step + 1}: held-out perplexity {log[-1]['heldout_perplexity']:.2f}")
    return log


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="downloads and unpacked packages")
    parser.add_argument("--corpus", type=Path, help="read the corpus from this JSON-lines file instead of Debian")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and tokenizer, for tests")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    return parser.parse_args(argv)



def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = TINY if args.tiny else TrainConfig()
    if args.max_steps is not None:
        config = replace(config, max_steps=args.max_steps)
    if args.seed is not None:
        config = replace(config, seed=args.seed)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    torch.manual_seed(config.seed)

    corpus = Corpus.load(args.corpus) if args.corpus else fetch_corpus(args.work_dir)
    train_corpus, heldout_corpus = corpus.split()
    print(f"corpus: {len(corpus.chapters)} chapters and {len(corpus.fortunes)} fortunes from {corpus.packages}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train_corpus.documents(), config.vocab_size)
    hf_tokenizer = save_tokenizer(tokenizer, config, args.out)
    heldout_ids = [t for ids in document_ids(tokenizer, heldout_corpus.documents()) for t in ids]
    model = LlamaForCausalLM(model_config(config, tokenizer))
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {num_parameters / 1e6:.2f}M parameters; tokenizer: {tokenizer.get_vocab_size()} tokens")

    job = TrainJob(config, train_corpus, args.out, heldout_ids, args.work_dir / "trained.pt", free_port())
    train_started = time.perf_counter()
    state_dict, log, cpu_seconds = run_training(job)
    train_seconds = time.perf_counter() - train_started
    model.load_state_dict(state_dict)
    nll_before_cast, _ = heldout_loss(model, heldout_ids, config.context_length)

    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, **GENERATION_DEFAULTS,
    )
    model.to(getattr(torch, config.storage_dtype)).save_pretrained(str(args.out))
    add_compat_config_keys(args.out / "config.json")
    heldout_corpus.save(args.out / "heldout.jsonl")
    shipped = AutoModelForCausalLM.from_pretrained(str(args.out), dtype=torch.float32)
    nll, count = heldout_loss(shipped, heldout_ids, config.context_length)
    heldout_bytes = sum(len(d.encode("utf-8")) for d in heldout_corpus.documents())
    report: dict[str, Any] = {
        "name": "lmserve-demo",
        "config": asdict(config),
        "model": {
            "architecture": "LlamaForCausalLM", "num_parameters": num_parameters,
            "vocab_size": tokenizer.get_vocab_size(), "hidden_size": config.hidden_size,
            "num_layers": config.num_layers, "num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
            "intermediate_size": config.intermediate_size, "context_length": config.context_length,
            "storage_dtype": config.storage_dtype,
        },
        "generation": GENERATION_DEFAULTS,
        "data": data_report(corpus, train_corpus, heldout_corpus, tokenizer),
        "training": {
            "steps": config.max_steps, "tokens_per_step": config.batch_size * config.context_length,
            "tokens_seen": config.max_steps * config.batch_size * config.context_length,
            "num_processes": config.num_processes, "threads_per_process": config.threads_per_process,
            "num_cpus": os.cpu_count(),
            "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds_per_process": round(cpu_seconds, 1),
            "loadavg_start": load_at_start, "loadavg_end": os.getloadavg(),
            "final_loss": log[-1]["loss"], "log": thin_log(log),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__},
        },
        "evaluation": {
            "text": "heldout.jsonl", "heldout_tokens": count, "heldout_bytes": heldout_bytes,
            "perplexity": round(math.exp(nll / count), 4),
            "bits_per_byte": round(nll / math.log(2) / heldout_bytes, 4),
            "perplexity_before_storage_cast": round(math.exp(nll_before_cast / count), 4),
        },
        "samples": demo_card.sample_replies(shipped, hf_tokenizer, config.seed),
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    demo_card.write_readme(args.out, report)
    print(f"held-out perplexity {report['evaluation']['perplexity']:.2f} "
          f"({report['evaluation']['bits_per_byte']:.3f} bits/byte) on {count} tokens; "
          f"{report['training']['wall_seconds'] / 60:.1f} min; wrote {args.out}")
    return report


def data_report(corpus: Corpus, train_corpus: Corpus, heldout_corpus: Corpus, tokenizer: Tokenizer) -> dict[str, Any]:
    return {
        "debian_packages": corpus.packages,
        "fortune_files": sorted({f.category for f in corpus.fortunes}),
        "num_chapters": len(corpus.chapters), "num_fortunes": len(corpus.fortunes),
        "heldout_every": HELDOUT_EVERY,
        "num_train_chapters": len(train_corpus.chapters), "num_train_fortunes": len(train_corpus.fortunes),
        "num_heldout_chapters": len(heldout_corpus.chapters), "num_heldout_fortunes": len(heldout_corpus.fortunes),
        "train_plain_tokens": sum(len(ids) for ids in document_ids(tokenizer, train_corpus.documents())),
    }


def thin_log(log: list[dict[str, float]], num_entries: int = 60) -> list[dict[str, float]]:
    """About `num_entries` evenly spaced entries of the loss log, plus every held-out measurement
    and the last step."""
    every = max(1, len(log) // num_entries)
    return [e for i, e in enumerate(log) if i % every == 0 or "heldout_perplexity" in e or i == len(log) - 1]


def add_compat_config_keys(path: Path) -> None:
    """transformers 5 writes `dtype` and `rope_parameters`; engines built on transformers 4 (and
    their config readers) look for `torch_dtype` and `rope_theta`. Both spellings load in both."""
    config = json.loads(path.read_text())
    config["torch_dtype"] = config["dtype"]
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
