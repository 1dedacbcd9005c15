"""lmserve: serve open large language models in production.

`from lmserve import LLM, SamplingParams` is the offline API. The names are resolved lazily so that
processes which never run a model (the gateway, the load generator) do not import PyTorch.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from lmserve.engine.llm import LLM
    from lmserve.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from lmserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from lmserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lmserve' has no attribute {name!r}")
