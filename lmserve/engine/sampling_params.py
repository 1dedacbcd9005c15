"""How to pick each next token of a request, validated up front so the engine never sees nonsense."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# A request may ask for at most this many top log-probabilities per token (OpenAI allows 20).
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on what a request may generate: JSON that validates against `json_schema`.

    Plain text, so it crosses the engine's process boundary as it is; the engine compiles it into a
    grammar once per distinct schema (lmserve.engine.grammar). Construction raises `ValueError`
    when `json_schema` is not the text of a JSON object.
    """

    json_schema: str
    """The schema as compact JSON text, properties in the client's order: the grammar (and so the
    output) follows that order, which is why the text is not key-sorted."""
    origin: str = "response_format"
    """The request field the constraint came from (response_format, tools); errors name it."""

    def __post_init__(self) -> None:
        try:
            schema = json.loads(self.json_schema)
        except (TypeError, ValueError):
            raise ValueError(f"{self.origin}: the JSON schema is not valid JSON") from None
        if not isinstance(schema, dict):
            raise ValueError(f"{self.origin}: the JSON schema must be a JSON object")

    @classmethod
    def from_schema(cls, schema: dict, origin: str = "response_format") -> StructuredOutputs:
        """The constraint for a schema given as a dict (the text is its compact JSON)."""
        return cls(json.dumps(schema, separators=(",", ":"), ensure_ascii=False), origin)


@dataclass
class SamplingParams:
    """Sampling settings of one request. Construction raises `ValueError` on any invalid value.

    Invariant after construction: `temperature == 0` means greedy (top_k/top_p/min_p are then
    irrelevant); every probability filter is in its valid range; `min_tokens <= max_tokens`.
    """

    max_tokens: int = 16
    """Most new tokens to generate (the request may stop earlier)."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens are suppressed until this many tokens were generated."""
    temperature: float = 1.0
    """0 picks the most likely token (greedy); higher values flatten the distribution."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (divides positive logits)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token that already appeared in the output."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit for each time it already appeared in the output."""
    seed: int | None = None
    """Makes sampling reproducible for this request regardless of what else runs beside it."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation ends after any of these tokens (in addition to end-of-sequence)."""
    stop: list[str] = field(default_factory=list)
    """Generation ends when the text contains any of these; matched on detokenized text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (for benchmarks)."""
    n: int = 1
    """Number of completions to generate from the same prompt."""
    logprobs: int | None = None
    """Return this many top log-probabilities per generated token (plus the chosen one); None: none."""
    prompt_logprobs: int | None = None
    """Return this many top log-probabilities per prompt token; None: none."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    structured: StructuredOutputs | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit before sampling (OpenAI's: -100 bans a token, 100 all but
    forces it); log-probabilities stay those of the model. At most MAX_LOGIT_BIAS entries."""
    """Constrain the output to JSON of a schema; it ends (finish reason stop) when the JSON is complete."""

    def __post_init__(self) -> None:
        self._check_int("max_tokens", self.max_tokens, minimum=1)
        self._check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not be greater than max_tokens ({self.max_tokens})"
            )
        self._check_int("n", self.n, minimum=1)
        self.temperature = self._check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self._check_int("top_k", self.top_k, minimum=-1)
        if self.top_k == -1:
            self.top_k = 0
        self.top_p = self._check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = self._check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = self._check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = self._check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        if self.seed is not None:
            self._check_int("seed", self.seed, minimum=None)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                self._check_int(name, value, minimum=0)
                if value > MAX_LOGPROBS:
                    raise ValueError(f"{name} must be at most {MAX_LOGPROBS}, got {value}")
        self.stop_token_ids = list(self.stop_token_ids)
        for token_id in self.stop_token_ids:
            self._check_int("stop_token_ids", token_id, minimum=0)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError("stop must be a list of non-empty strings")
        self._check_logit_bias()
        if self.structured is not None and (self.ignore_eos or self.min_tokens):
            # The grammar decides where the output ends; both would fight it.
            raise ValueError(f"{self.structured.origin} cannot be combined with ignore_eos or min_tokens")

    def _check_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias must map token ids to numbers")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        checked = {}
        for token_id, bias in self.logit_bias.items():
            self._check_int("logit_bias token id", token_id, minimum=0)
            value = self._check_float("logit_bias value", bias)
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
            checked[token_id] = value
        self.logit_bias = checked

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )

    @staticmethod
    def _check_int(name: str, value: object, minimum: int | None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")

    @staticmethod
    def _check_float(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return number
