"""Constrained decoding: JSON schemas compiled into token-level grammars with llguidance.

`GrammarCompiler` turns a request's `StructuredOutputs` into an llguidance matcher, compiling each
distinct schema once (an LRU of matchers in their start state, deep-copied per sequence).
`StructuredDecoder` keeps one matcher per constrained live sequence and answers, each step, which
tokens each of them may take next; the sampler masks the other tokens of those rows only.

A matcher follows its sequence's output tokens rather than the sampler's calls: it is brought up to
date from `Sequence.output_token_ids` (`sync`), so a step that appends no token, such as the
recomputation of a preempted sequence, never advances it twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmserve.engine.sampling_params import StructuredOutputs
from lmserve.engine.sequence import Sequence

logger = logging.getLogger("lmserve.engine")

JSON_COMPILE_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions (a stub-only type)
"""Compact JSON (no whitespace between tokens): a model cannot pad its answer with endless blank
lines, and the output is what `json.dumps(..., separators=(",", ":"))` would write."""


class GrammarError(ValueError):
    """A schema that cannot be compiled; `param` is the request field it came from."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # type: ignore[no-untyped-def]
        """Pickles with its param (it crosses from the engine process to the server)."""
        return GrammarError, (str(self), self.param)


class GrammarCompiler:
    """Compiles schemas for one tokenizer.

    Invariant: `_cache` holds at most `capacity` matchers in their start state, the most recently
    used last; they are only ever deep-copied, never advanced.
    """

    def __init__(self, tokenizer_path: str | Path, vocab_size: int, eos_token_id: int, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"the grammar cache capacity must be >= 1, got {capacity}")
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.capacity = capacity
        self.num_compiled = 0
        """Schemas compiled since start (cache misses)."""
        self._tokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def matcher(self, spec: StructuredOutputs) -> Any:
        """A fresh `llguidance.LLMatcher` for `spec`; raises GrammarError when it cannot compile."""
        key = spec.json_schema
        prototype = self._cache.get(key)
        if prototype is None:
            prototype = self._compile(spec)
            self._cache[key] = prototype
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return prototype.deep_copy()

    def _compile(self, spec: StructuredOutputs) -> Any:
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, overrides=JSON_COMPILE_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"Invalid JSON schema in {spec.origin}: {exc}", spec.origin) from None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"Invalid JSON schema in {spec.origin}: {matcher.get_error()}", spec.origin)
        self.num_compiled += 1
        return matcher

    def _llg_tokenizer(self) -> Any:
        """llguidance's view of the model's tokenizer, built on first use (about a second for a
        vocabulary of 150k tokens), so a server that never constrains never pays for it."""
        if self._tokenizer is None:
            import llguidance

            from lmserve.engine.tokenizer import Tokenizer

            backend = Tokenizer.from_pretrained(self.tokenizer_path).hf.backend_tokenizer
            # The JSON of the Rust tokenizer includes the added tokens of tokenizer_config.json.
            self._tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_token_id)
        return self._tokenizer


@dataclass
class _MatcherState:
    matcher: Any
    num_consumed: int = 0
    """Output tokens of the sequence the matcher has consumed."""


class StructuredDecoder:
    """The matchers of the constrained live sequences, by seq_id.

    Invariant: the matcher of a sequence has consumed exactly its first `num_consumed` output
    tokens; `sync` consumes the rest, so calling it twice, or after a step that added no token,
    changes nothing.
    """

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._states: dict[int, _MatcherState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def add(self, seqs: list[Sequence]) -> None:
        """Gives each constrained sequence its matcher; raises GrammarError (adding none) when the
        schema cannot compile."""
        matchers = [(seq, self.compiler.matcher(seq.params.structured)) for seq in seqs
                    if seq.params.structured is not None]
        for seq, matcher in matchers:
            self._states[seq.seq_id] = _MatcherState(matcher)

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    def is_constrained(self, seq: Sequence) -> bool:
        return seq.seq_id in self._states

    def sync(self, seq: Sequence) -> bool:
        """Brings the sequence's matcher up to its output; True when the grammar is complete (no
        token but end-of-sequence may follow) or broken."""
        state = self._states[seq.seq_id]
        new_tokens = seq.output_token_ids[state.num_consumed:]
        if new_tokens:
            if not state.matcher.consume_tokens(new_tokens):
                logger.warning("a constrained sequence left its grammar: %s", state.matcher.get_error(),
                               extra={"fields": {"request_id": seq.request_id}})
            state.num_consumed += len(new_tokens)
        return bool(state.matcher.is_stopped())

    def completed(self, seqs: list[Sequence]) -> list[Sequence]:
        """The constrained sequences among `seqs` whose grammar is complete after their new tokens."""
        return [seq for seq in seqs if seq.seq_id in self._states and self.sync(seq)]

    def allowed_tokens(self, seqs: list[Sequence], vocab_size: int) -> np.ndarray:
        """[len(seqs), vocab_size] booleans: the tokens each (constrained) sequence may take next.

        A matcher in an error state allows only end-of-sequence, so the sequence ends at once."""
        num_words = (vocab_size + 31) // 32
        bitmask = np.zeros((len(seqs), num_words), dtype=np.uint32)
        for row, seq in enumerate(seqs):
            self.sync(seq)
            matcher = self._states[seq.seq_id].matcher
            if matcher.is_error():
                eos = self.compiler.eos_token_id
                bitmask[row, eos // 32] = 1 << (eos % 32)
                continue
            mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32)
            bitmask[row, : len(mask)] = mask[:num_words]
        # Token t is bit t % 32 of word t // 32: in little-endian bytes, bit t % 8 of byte t // 8.
        bits = np.unpackbits(bitmask.astype("<u4").view(np.uint8), axis=1, bitorder="little")
        return bits[:, :vocab_size].astype(bool)
