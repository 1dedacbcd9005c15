"""The cost of constrained decoding on a batch: the same requests with half of them constrained to a
JSON schema, against all of them free (offline engine, `lmserve.LLM`).

    PYTHONPATH=. .venv/bin/python benchmarks/structured_outputs.py                 # demo model, 32 requests
    PYTHONPATH=. .venv/bin/python benchmarks/structured_outputs.py --num-requests 8 --max-tokens 32

A constrained request ends as soon as its JSON is complete, so the two runs generate different
numbers of tokens: the figure to compare is the time per engine step (each step samples one token
for every running sequence), with tokens per second beside it. Prompts: numpy default_rng(0), 16
to 128 token ids each; sampling at temperature 0.8 with a seed per request; the free requests
ignore end-of-sequence, so both runs keep the batch full. One untimed warm-up run compiles the
schema, builds llguidance's tokenizer and runs the batch's shapes first. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from lmserve import LLM, SamplingParams
from lmserve.engine.sampling_params import StructuredOutputs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["fortune", "verse", "proverb"]},
        "words": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["name", "kind", "words", "score"],
    "additionalProperties": False,
}


def requests(num: int, max_tokens: int, vocab: int, constrained: bool) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, vocab, size=int(rng.integers(16, 129))).tolist() for _ in range(num)]
    spec = StructuredOutputs.from_schema(SCHEMA)
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, structured=spec)
        if constrained and i % 2 else SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True)
        for i in range(num)
    ]
    return prompts, params


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, Any]:
    steps_before = llm.engine.stats().num_steps
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    steps = llm.engine.stats().num_steps - steps_before
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    valid = 0
    for out, p in zip(outputs, params):
        if p.structured is not None and llm.tokenizer is not None:
            try:
                json.loads(llm.tokenizer.decode(out.outputs[0].token_ids))
                valid += 1
            except ValueError:
                pass
    return {"seconds": round(seconds, 3), "steps": steps, "ms_per_step": round(1000 * seconds / steps, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "constrained_json_parsed": valid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(args.model)
    vocab = llm.engine.vocab_size
    run(llm, *requests(args.num_requests, 16, vocab, constrained=True))  # warm-up: the schema, the batch's shapes
    for constrained in (False, True):
        result = run(llm, *requests(args.num_requests, args.max_tokens, vocab, constrained))
        print(json.dumps({"half_constrained": constrained, "num_requests": args.num_requests,
                          "max_tokens": args.max_tokens, **result}))


if __name__ == "__main__":
    main()
