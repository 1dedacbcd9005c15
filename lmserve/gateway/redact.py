"""Output filter: replaces configured regexes in completions, also across streamed chunks.

In a stream, each choice keeps a tail of not-yet-sent text. Text is released only up to a cut point
`max_match_chars` before the end of what has arrived, moved back to the start of any match that
spans it, so a match split over several chunks is always seen whole before any of it is sent.
Invariant: concatenating everything released plus `flush()` equals `redact(all text received)`,
for matches no longer than `max_match_chars`.

Log-probabilities spell the text again, token by token (`token`, `bytes`, `top_logprobs`,
`text_offset`); redact_logprobs.py masks the entries of tokens that overlap a match and holds back
the entries of a stream's tail the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lmserve.gateway.redact_logprobs import LogprobsHold, redact_logprobs
from lmserve.gateway.redact_patterns import CHECKS, NAMED_PATTERNS, unknown_names

_GROUP = "lmserve_named_"


def compile_patterns(patterns: Sequence[str], named: Sequence[str] = ()) -> re.Pattern[str]:
    """One regex for the user's `patterns` and the `named` sets; a one-line ValueError names what is wrong."""
    for key, values in (("patterns", patterns), ("named_patterns", named)):
        if isinstance(values, str) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"redaction.{key} must be a list of strings, got {values!r}")
    unknown = unknown_names(list(named))
    if unknown:
        raise ValueError(f"redaction.named_patterns: unknown name(s) {unknown}; known: {sorted(NAMED_PATTERNS)}")
    for i, pattern in enumerate(patterns):
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"redaction.patterns[{i}] {pattern!r} does not compile: {exc}") from None
        if compiled.search("") is not None:
            raise ValueError(f"redaction.patterns[{i}] {pattern!r} matches the empty string")
    parts = [f"(?:{p})" for p in patterns] + [f"(?P<{_GROUP}{n}>{NAMED_PATTERNS[n]})" for n in dict.fromkeys(named)]
    try:
        return re.compile("|".join(parts))
    except re.error as exc:  # e.g. a user pattern's group name clashes with another's
        raise ValueError(f"redaction patterns do not compile together: {exc}") from None


class Redactor:
    """Replaces every match of the user's regexes and the named pattern sets with `replacement`,
    in text and in the log-probabilities that would spell the same text again."""

    def __init__(self, patterns: Sequence[str], replacement: str, max_match_chars: int,
                 named: Sequence[str] = ()) -> None:
        self.regex = compile_patterns(patterns, named)
        self.replacement = replacement
        self.holdback = max_match_chars
        self.checks = [(f"{_GROUP}{n}", CHECKS[n]) for n in named if n in CHECKS]

    def is_secret(self, match: re.Match[str]) -> bool:
        """False for a candidate that a named set's extra check rejects (a digit run failing Luhn)."""
        for group, check in self.checks:
            if match.group(group) is not None:
                return check(match.group(0))
        return True

    def _replace(self, match: re.Match[str]) -> str:
        return self.replacement if self.is_secret(match) else match.group(0)

    def redact(self, text: str) -> str:
        return self.regex.sub(self._replace, text)

    def secret_spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every match of `text` that `redact` replaces."""
        return [m.span() for m in self.regex.finditer(text) if self.is_secret(m)]

    def safe_cut(self, text: str, cut: int) -> int:
        """`cut` moved back to the start of any match that spans it (a match is released whole)."""
        if cut <= 0:
            return 0
        for match in self.regex.finditer(text):
            if match.start() < cut < match.end():
                return match.start()
            if match.start() >= cut:
                break
        return cut

    def redact_response(self, body: dict[str, Any]) -> None:
        """Redacts a non-streamed chat or text completion in place, log-probabilities included."""
        for choice in body.get("choices") or []:
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = self.redact(message["content"])
            if isinstance(choice.get("text"), str):
                choice["text"] = self.redact(choice["text"])
            if isinstance(choice.get("logprobs"), dict):
                choice["logprobs"] = redact_logprobs(self, choice["logprobs"])

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)


class StreamRedactor:
    """Per-stream state: the held-back tail of each choice index, and of its log-probabilities."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.pending: dict[int, str] = {}
        self.logprobs = LogprobsHold(redactor)

    def feed(self, index: int, text: str, is_final: bool) -> str:
        """Adds streamed text of choice `index`; returns what may be sent now."""
        buf = self.pending.get(index, "") + text
        if is_final:
            self.pending.pop(index, None)
            return self.redactor.redact(buf)
        cut = self.redactor.safe_cut(buf, len(buf) - self.redactor.holdback)
        if cut == 0:
            self.pending[index] = buf
            return ""
        self.pending[index] = buf[cut:]
        return self.redactor.redact(buf[:cut])

    def flush(self) -> dict[int, str]:
        """Everything still held, redacted (when the stream ends without a finish_reason)."""
        out = {i: self.redactor.redact(text) for i, text in self.pending.items() if text}
        self.pending.clear()
        return out
