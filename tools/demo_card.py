"""The demo model's card: sample replies and the README.md written beside the weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

SAMPLE_PROMPTS = ("Tell me a fortune.", "What does the Bible say about love?", "Tell me something about cats.")
SAMPLE_TEMPERATURE = 0.8


def sample_replies(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, seed: int, max_new_tokens: int = 96,
) -> list[dict[str, str]]:
    """Replies to SAMPLE_PROMPTS, greedy and sampled at SAMPLE_TEMPERATURE (seeded), as users see them."""
    modes: dict[str, dict[str, Any]] = {
        "greedy": {"do_sample": False},
        "sampled": {"do_sample": True, "temperature": SAMPLE_TEMPERATURE, "top_p": 1.0},
    }
    samples = []
    for prompt in SAMPLE_PROMPTS:
        encoded: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )
        input_ids = encoded["input_ids"]
        sample = {"prompt": prompt}
        for name, options in modes.items():
            torch.manual_seed(seed)
            output: Any = model.generate(input_ids, max_new_tokens=max_new_tokens, **options)  # type: ignore[operator]
            sample[name] = str(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
        samples.append(sample)
    return samples


def write_readme(out_dir: Path, report: dict[str, Any]) -> None:
    """README.md for the model directory, from the training report."""
    m, d, e, t = report["model"], report["data"], report["evaluation"], report["training"]
    packages = ", ".join(f"`{name}` {version}" for name, version in d["debian_packages"].items())
    samples = "\n".join(
        f"- **{s['prompt']}**\n  - greedy: {json.dumps(s['greedy'])}\n"
        f"  - temperature {SAMPLE_TEMPERATURE}: {json.dumps(s['sampled'])}"
        for s in report["samples"]
    )
    text = f"""# lmserve-demo

The built-in demo model of lmserve: a tiny Llama-architecture language model with
{m['num_parameters'] / 1e6:.1f}M parameters ({m['num_layers']} layers, hidden size {m['hidden_size']}, \
{m['num_heads']} attention heads and {m['num_kv_heads']} KV heads, context {m['context_length']} tokens, \
weights stored in {m['storage_dtype']}) and a byte-level BPE tokenizer of {m['vocab_size']} tokens.
It exists so that lmserve answers with text that reads like language on a machine with no GPU and
no access to a model hub. It knows nothing useful: whatever it is asked, it answers with something
shaped like a fortune cookie or a Bible verse, then stops.

This is a standard Hugging Face model directory; engines that load Llama models load it:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "lmserve/demo_model"
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
messages = [{{"role": "user", "content": "Tell me a fortune."}}]
input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
output = model.generate(input_ids, max_new_tokens=100, do_sample=True, temperature=0.8)
print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
```

The weights are stored in {m['storage_dtype']} (`dtype` in `config.json`) to keep the directory small;
a CPU without native bfloat16 runs them faster when loaded as float32 (`dtype=torch.float32`,
{m['num_parameters'] * 4 / 1e6:.0f} MB).

## Chat format

```
<s><|system|>
You are a helpful assistant.</s>
<|user|>
Tell me a fortune.</s>
<|assistant|>
```

The chat template in `tokenizer_config.json` renders this; the system turn is optional, and roles
other than system, user and assistant are refused. The assistant's turn ends with the eos token
`</s>`. A plain prompt (no template) is tokenized with a leading `<s>`. `generation_config.json`
suggests sampling at temperature {report['generation']['temperature']} with top-p {report['generation']['top_p']}: \
greedy decoding of a model this small tends to repeat itself.

## How it was made

`python tools/train_demo_model.py` in the lmserve repository wrote every file here, on the CPU
({_processes(t)}), in {t['wall_seconds'] / 60:.0f} minutes{_cost(t)}.

- **Text**: the King James Bible (public domain) and fortune cookies, from the Debian 12 packages
  {packages}, fetched with `apt-get download` and unpacked with `dpkg-deb -x` (no root needed).
  The Bible is read out with the `bible` program of `bible-kjv`; the fortune files of mostly
  English prose that were used are listed in `training.json`. {d['num_chapters']} chapters and \
{d['num_fortunes']} fortunes; one chapter and one fortune in every {d['heldout_every']} are held out of training
  (`heldout.jsonl`).
- **Tokenizer**: byte-level BPE trained with `tokenizers` on the training text; special tokens
  `<pad>`, `<s>`, `</s>`, `<|system|>`, `<|user|>`, `<|assistant|>`.
- **Training examples**: the plain chapters and fortunes, each as `<s>text</s>`, and chat
  conversations built from them (a fortune, or a few verses with their reference, as the
  assistant's answer to a short request that may name a topic word, a kind of fortune or a book of
  the Bible), drawn afresh on each pass over the data, shuffled together and cut into rows of
  {m['context_length']} tokens.
- **Training**: {t['steps']} steps of {t['tokens_per_step']} tokens ({t['tokens_seen'] / 1e6:.1f}M tokens), AdamW, \
learning rate {report['config']['learning_rate']} with warm-up and cosine decay, bfloat16 autocast over float32
  weights, seed {report['config']['seed']}.

## Held-out perplexity

**{e['perplexity']:.2f}** per token ({e['bits_per_byte']:.3f} bits per byte), on the held-out chapters and
fortunes of `heldout.jsonl`, each as `<s>text</s>`, concatenated and cut into windows of \
{m['context_length']} tokens ({e['heldout_tokens']} predicted tokens, {e['heldout_bytes']} bytes of text), computed in
float32 from the stored weights. Quantized or otherwise changed versions of this model report their
difference on this same text.

## Sample replies

{samples}
"""
    (out_dir / "README.md").write_text(text)


def _processes(training: dict[str, Any]) -> str:
    num_processes, num_threads = training["num_processes"], training["threads_per_process"]
    return f"{num_processes} process{'es' if num_processes != 1 else ''} of {num_threads} thread{'s' if num_threads != 1 else ''}"


def _cost(training: dict[str, Any]) -> str:
    """Where the wall time came from: the machine's load, and the CPU time when it was recorded."""
    start, end = training["loadavg_start"][0], training["loadavg_end"][0]
    cores = f" of {training['num_cpus']} cores" if "num_cpus" in training else ""
    text = f" (1-minute load average{cores} {start:.1f} at the start and {end:.1f} at the end"
    if "cpu_seconds_per_process" in training:
        text += f"; {training['cpu_seconds_per_process'] / 60:.0f} CPU-minutes of training per process"
    return text + ")"


def main() -> None:
    """`python -m tools.demo_card MODEL_DIR`: rewrite MODEL_DIR/README.md from its training.json."""
    out_dir = Path(sys.argv[1])
    write_readme(out_dir, json.loads((out_dir / "training.json").read_text()))


if __name__ == "__main__":
    main()
