"""Token ids to text, one step at a time, without ever emitting half a character or half a stop string."""

from __future__ import annotations

from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.tokenizer import Tokenizer

# Prompt tokens kept as context, so the first output token decodes with the right leading space.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas.

    Each step decodes a short window twice (`[prefix_offset, read_offset)` and
    `[prefix_offset, end)`) and emits the difference, so tokenizers that drop a leading space at
    the start of a decode (SentencePiece) or split a character over several byte tokens (byte-level
    BPE) are handled alike. Text ending in U+FFFD is held back until the character completes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def push(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset, len(self.token_ids))
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset, len(self.token_ids))
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)


class TextStream:
    """The text of one generated sequence, with stop strings applied.

    Invariant: `text[:num_emitted]` was handed out and can never be taken back, so nothing that
    could still become the start of a stop string is emitted before it is decided.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.text = ""
        self.num_emitted = 0
        self.stopped = False
        self._max_stop = max((len(s) for s in self.stop), default=0)

    def push(self, token_ids: list[int]) -> str:
        """Adds tokens; returns the text that may be emitted now. After a stop match, returns ''."""
        if self.stopped:
            return ""
        delta = self.detokenizer.push(token_ids)
        if not delta:
            return ""
        self.text += delta
        if self.stop and self._match_stop(len(delta)):
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The sequence ended: release everything still held back."""
        if not self.stopped:
            rest = self.detokenizer.flush()
            self.text += rest
            if self.stop and rest:
                self._match_stop(len(rest))
        return self._emit(len(self.text))

    def _match_stop(self, delta_len: int) -> bool:
        search_from = max(0, len(self.text) - delta_len - self._max_stop + 1)
        found = [(self.text.find(s, search_from), s) for s in self.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return False
        index, stop = min(found)
        self.text = self.text[: index + (len(stop) if self.include_stop else 0)]
        self.stopped = True
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.num_emitted)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
