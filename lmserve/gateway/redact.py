"""Output filter: replaces configured regexes in completions, also across streamed chunks.

In a stream, each choice keeps a tail of not-yet-sent text. Text is released only up to a cut point
`max_match_chars` before the end of what has arrived, moved back to the start of any match that
spans it, so a match split over several chunks is always seen whole before any of it is sent.
Invariant: concatenating everything released plus `flush()` equals `redact(all text received)`,
for matches no longer than `max_match_chars`.
"""

from __future__ import annotations

import re
from typing import Any


class Redactor:
    def __init__(self, patterns: list[str], replacement: str, max_match_chars: int) -> None:
        try:
            self.regex = re.compile("|".join(f"(?:{p})" for p in patterns))
        except re.error as exc:
            raise ValueError(f"redaction pattern does not compile: {exc}") from exc
        self.replacement = replacement
        self.holdback = max_match_chars

    def redact(self, text: str) -> str:
        return self.regex.sub(self.replacement, text)

    def redact_response(self, body: dict[str, Any]) -> None:
        """Redacts a non-streamed chat or text completion in place."""
        for choice in body.get("choices") or []:
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = self.redact(message["content"])
            if isinstance(choice.get("text"), str):
                choice["text"] = self.redact(choice["text"])

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)


class StreamRedactor:
    """Per-stream state: the held-back tail of each choice index."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.pending: dict[int, str] = {}

    def feed(self, index: int, text: str, is_final: bool) -> str:
        """Adds streamed text of choice `index`; returns what may be sent now."""
        buf = self.pending.get(index, "") + text
        if is_final:
            self.pending.pop(index, None)
            return self.redactor.redact(buf)
        cut = len(buf) - self.redactor.holdback
        if cut <= 0:
            self.pending[index] = buf
            return ""
        for match in self.redactor.regex.finditer(buf):
            if match.start() < cut < match.end():
                cut = match.start()
                break
            if match.start() >= cut:
                break
        self.pending[index] = buf[cut:]
        return self.redactor.redact(buf[:cut])

    def flush(self) -> dict[int, str]:
        """Everything still held, redacted (when the stream ends without a finish_reason)."""
        out = {i: self.redactor.redact(text) for i, text in self.pending.items() if text}
        self.pending.clear()
        return out
