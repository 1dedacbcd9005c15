"""lmserve: the offline `LLM.generate` with token-id prompts, in the project's own `.venv`.

`config["llm"]` holds the keyword arguments of `lmserve.LLM` (see `engine_throughput.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common import TokenIds, run


class LmserveEngine:
    def __init__(self, model_dir: str, config: dict[str, Any]) -> None:
        import lmserve

        self._lmserve = lmserve
        self.llm = lmserve.LLM(model=model_dir, **config["llm"])

    def generate(self, prompts: Sequence[TokenIds], output_lens: Sequence[int]) -> list[TokenIds]:
        sampling_params = self._lmserve.SamplingParams
        params = [sampling_params(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
        outputs = self.llm.generate([list(p) for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]


def make_engine(model_dir: str, config: dict[str, Any]) -> tuple[LmserveEngine, dict[str, Any]]:
    engine = LmserveEngine(model_dir, config)
    import torch

    facts = {
        "lmserve": getattr(engine._lmserve, "__version__", "unknown"),
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "llm": config["llm"],
    }
    return engine, facts


if __name__ == "__main__":
    run(make_engine)
