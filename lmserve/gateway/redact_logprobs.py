"""Redaction of log-probabilities: the tokens of redacted text must not spell it out again.

OpenAI answers carry each output token once more in `logprobs`: chat as `content[]` entries
(`token`, `bytes`, `top_logprobs[]` alternatives), text completions as parallel lists (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`). The rule: the secrets are found in the text the
tokens spell (their concatenation), and every run of tokens that overlaps one is replaced by a
single entry whose token is that run's text redacted (so the tokens still spell the redacted
text), whose log-probability is the run's sum and which lists no alternatives. Alternatives of
other tokens are redacted one by one. `text_offset` is recomputed for the redacted text.

A log-probability object in a layout this module does not know is dropped, not passed on.
In a stream, `LogprobsHold` keeps back the entries of each choice's tail exactly like the text:
the cut sits `max_match_chars` before the end, before any match that spans it, and on a token
boundary, so a secret split over chunks is masked as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmserve.gateway.redact import Redactor

CHAT, TEXT = "chat", "text"


@dataclass
class _Token:
    text: str
    logprob: float | None
    top: list[tuple[str, float | None]] | None
    raw: dict[str, Any] | None = None
    """The chat entry as it came, sent unchanged when nothing in it needed redaction."""
    offset: int | None = None


def _parse(logprobs: Any) -> tuple[str, list[_Token]] | None:
    """(layout, tokens) of a chat or text-completion logprobs object; None for anything else."""
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if isinstance(content, list) and all(isinstance(e, dict) and isinstance(e.get("token"), str) for e in content):
        return CHAT, [_Token(e["token"], e.get("logprob"),
                             [(a.get("token", ""), a.get("logprob")) for a in e.get("top_logprobs") or []
                              if isinstance(a, dict)], raw=e)
                      for e in content]
    tokens = logprobs.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        values = _column(logprobs, "token_logprobs", len(tokens))
        tops = _column(logprobs, "top_logprobs", len(tokens))
        offsets = _column(logprobs, "text_offset", len(tokens))
        return TEXT, [_Token(t, v, list(top.items()) if isinstance(top, dict) else None,
                             offset=o if isinstance(o, int) else None)
                      for t, v, top, o in zip(tokens, values, tops, offsets)]
    return None


def _column(logprobs: dict[str, Any], key: str, size: int) -> list[Any]:
    values = logprobs.get(key)
    return list(values)[:size] + [None] * (size - len(values)) if isinstance(values, list) else [None] * size


def _mask(redactor: Redactor, tokens: list[_Token]) -> list[_Token]:
    """Each run of tokens overlapping a secret becomes one redacted entry; other tokens keep theirs."""
    text = "".join(t.text for t in tokens)
    spans = redactor.secret_spans(text)
    starts = [0]
    for token in tokens:
        starts.append(starts[-1] + len(token.text))
    out: list[_Token] = []
    i = s = 0
    while i < len(tokens):
        while s < len(spans) and spans[s][1] <= starts[i]:
            s += 1
        if s == len(spans) or spans[s][0] >= max(starts[i + 1], starts[i] + 1):
            out.append(_clean(redactor, tokens[i]))
            i += 1
            continue
        j, end, first = i + 1, max(starts[i + 1], spans[s][1]), s
        while True:  # grow the run until no token or secret crosses its end
            while j < len(tokens) and starts[j] < end:
                end, j = max(end, starts[j + 1]), j + 1
            while s + 1 < len(spans) and spans[s + 1][0] < end:
                s += 1
                end = max(end, spans[s][1])
            if j == len(tokens) or starts[j] >= end:
                break
        merged, at = [], starts[i]
        for start, stop in spans[first:s + 1]:
            merged += [text[at:start], redactor.replacement]
            at = stop
        merged.append(text[at:starts[j]])
        values = [t.logprob for t in tokens[i:j]]
        total = sum(v for v in values if v is not None) if all(v is not None for v in values) else None
        out.append(_Token("".join(merged), total, [], offset=tokens[i].offset))
        i, s = j, s + 1
    return out


def _clean(redactor: Redactor, token: _Token) -> _Token:
    """The token with any secret in its alternatives redacted (its own text holds none)."""
    if not token.top or not any(redactor.secret_spans(alt) for alt, _ in token.top):
        return token
    top: dict[str, float | None] = {}
    for alt, value in token.top:
        top.setdefault(redactor.redact(alt), value)  # alternatives come most likely first
    return _Token(token.text, token.logprob, list(top.items()), offset=token.offset)


def _chat_entry(text: str, value: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}


def _build(layout: str, tokens: list[_Token], offset: int) -> dict[str, Any]:
    """The logprobs object of `tokens`; text offsets count from `offset`."""
    if layout == CHAT:
        content = [t.raw if t.raw is not None else
                   {**_chat_entry(t.text, t.logprob), "top_logprobs": [_chat_entry(a, v) for a, v in t.top or []]}
                   for t in tokens]
        return {"content": content}
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.top is None else dict(t.top) for t in tokens], "text_offset": offsets}


def redact_logprobs(redactor: Redactor, logprobs: Any) -> dict[str, Any] | None:
    """A whole answer's logprobs object with its secrets masked (None when its layout is unknown)."""
    parsed = _parse(logprobs)
    if parsed is None:
        return None
    layout, tokens = parsed
    first = tokens[0].offset if tokens and tokens[0].offset is not None else 0
    return _build(layout, _mask(redactor, tokens), first)


class LogprobsHold:
    """Per-stream state: the held-back log-probability tokens of each choice, its layout and the
    offset in the redacted text where the next released token starts."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.pending: dict[int, list[_Token]] = {}
        self.layouts: dict[int, str] = {}
        self.offsets: dict[int, int] = {}

    def feed(self, index: int, logprobs: Any, is_final: bool) -> dict[str, Any] | None:
        """Adds a chunk's logprobs of choice `index`; returns the logprobs object to send with it."""
        parsed = _parse(logprobs) if logprobs is not None else None
        if parsed is not None:
            self.layouts.setdefault(index, parsed[0])
            if index not in self.offsets and parsed[1]:
                self.offsets[index] = parsed[1][0].offset or 0
        layout = self.layouts.get(index)
        if layout is None or (parsed is not None and parsed[0] != layout):
            return None
        tokens = self.pending.pop(index, []) + (parsed[1] if parsed is not None else [])
        count = len(tokens) if is_final else self._releasable(tokens)
        if count < len(tokens):
            self.pending[index] = tokens[count:]
        if count == 0 and logprobs is None:
            return None
        return self._release(index, layout, tokens[:count])

    def _releasable(self, tokens: list[_Token]) -> int:
        """How many leading tokens end before the cut (which never falls inside a match)."""
        text = "".join(t.text for t in tokens)
        cut = self.redactor.safe_cut(text, len(text) - self.redactor.holdback)
        while True:
            count, end = 0, 0
            while count < len(tokens) and end + len(tokens[count].text) <= cut:
                end += len(tokens[count].text)
                count += 1
            if end == cut:
                return count
            cut = self.redactor.safe_cut(text, end)

    def _release(self, index: int, layout: str, tokens: list[_Token]) -> dict[str, Any]:
        masked = _mask(self.redactor, tokens)
        offset = self.offsets.get(index, 0)
        self.offsets[index] = offset + sum(len(t.text) for t in masked)
        return _build(layout, masked, offset)

    def flush(self) -> dict[int, dict[str, Any]]:
        """Everything still held, per choice, masked (when the stream ends without a finish_reason)."""
        out = {i: self._release(i, self.layouts[i], tokens) for i, tokens in self.pending.items() if tokens}
        self.pending.clear()
        return out
