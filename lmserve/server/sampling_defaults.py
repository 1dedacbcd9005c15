"""Sampling defaults a model ships in its generation_config.json, for requests that leave them out.

This is vLLM's `--generation-config auto`: the model's authors know whether it should be sampled at
temperature 0.8 or 1.0, so a client that sends no temperature gets theirs, not OpenAI's 1.0. A value
the request does send always wins.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmserve.engine.sampling_params import SamplingParams

SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""The generation_config.json keys that become request defaults (the ones vLLM takes, less max_new_tokens)."""

GENERATION_CONFIG_MODES = ("auto", "none")


def read_sampling_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling keys present in `model_dir`/generation_config.json ({} when there is no file).

    `do_sample` is ignored, as vLLM ignores it: a request that wants greedy decoding sends
    temperature 0. Raises ValueError, naming the file, when a value is not a valid sampling setting.
    """
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    try:
        defaults = {key: config[key] for key in SAMPLING_DEFAULT_KEYS if config.get(key) is not None}
        SamplingParams(**defaults)
    except AttributeError:
        raise ValueError(f"{path} must hold a JSON object") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc} (--generation-config none ignores the file)") from None
    return defaults
