"""The state of one generated sequence: the single place that says where a sequence is."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from lmserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """In the waiting queue: new, or preempted and to be recomputed."""
    RUNNING = "running"
    """Holds KV blocks and is scheduled every step until it finishes or is preempted."""
    SWAPPED = "swapped"
    """Preempted with its KV blocks copied to the CPU pool; restored before it runs again."""
    FINISHED = "finished"
    """Done; holds nothing."""


class FinishReason(str, enum.Enum):
    STOP = "stop"
    """End-of-sequence token, a stop token or a stop string."""
    LENGTH = "length"
    """max_tokens reached, or the model's context is full."""
    ABORT = "abort"
    """Cancelled by the caller (client disconnect, explicit abort)."""
    TIMEOUT = "timeout"
    """Waited too long in the queue, or can no longer meet its deadline."""


@dataclass(eq=False)
class Sequence:
    """One sequence of tokens being generated: a request with n > 1 has n of them.

    Invariants: `token_ids[:num_prompt_tokens]` is the prompt and the rest is output;
    `0 <= num_computed_tokens <= num_tokens`; the KV cache holds valid entries for exactly the
    first `num_computed_tokens` tokens while the sequence is RUNNING.
    """

    seq_id: int
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    tenant: str = ""
    deadline: float | None = None
    """Absolute time (engine clock) by which the first token must be produced."""
    queue_timeout: float | None = None
    """Absolute time (engine clock) after which a sequence still waiting is finished with timeout."""
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None
    """Prompt tokens found in the prefix cache when the sequence was first scheduled."""
    finish_reason: FinishReason | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    """Chained hashes of this sequence's full blocks, computed once as blocks fill."""
    prompt_logprobs: list[Any] = field(default_factory=lambda: [None])
    """Log-probabilities of prompt tokens 0.. (token 0 has none), when the request asks for them."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
