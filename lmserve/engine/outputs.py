"""What the engine reports: per-step deltas of each sequence, and whole results for offline use."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.engine.sampler import TokenLogprobs
from lmserve.engine.sequence import FinishReason


@dataclass
class SequenceOutput:
    """What one sequence gained in one step (a token, an end, or both)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_seconds: float | None = None
    """Time from arrival to first being scheduled (None until scheduled)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With the first token, when asked for: one entry per prompt token (the first is None)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """One completed sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    """A whole request: its prompt and its n completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)
