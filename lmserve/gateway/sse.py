"""Server-sent events of OpenAI streams: splitting, usage extraction, usage stripping, redaction
(of text and log-probabilities).

Events are separated by a blank line. The splitter keeps only an incomplete trailing event between
chunks, so complete events are never held back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from lmserve.gateway.redact import StreamRedactor

DONE = b"data: [DONE]"


class EventSplitter:
    """Invariant: `pending` holds bytes after the last complete event, never a complete event."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self.pending + chunk if self.pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        parts = data.split(b"\n\n")
        self.pending = parts.pop()
        return [p for p in parts if p]


def parse_usage(payload: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) tokens from an OpenAI `usage` object, or None."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached or 0)


def has_usage(event: bytes) -> bool:
    index = event.find(b'"usage"')
    if index < 0:
        return False
    tail = event[index + 7:index + 16].lstrip(b": ")
    return tail.startswith(b"{")


@dataclass
class StreamTransform:
    """What a stream needs done to it; with neither flag set events pass through untouched."""

    strip_usage: bool
    redactor: StreamRedactor | None

    def apply(self, event: bytes, payload: dict[str, Any] | None) -> bytes | None:
        """Returns the event to send (possibly rewritten) or None to drop it."""
        if payload is None:
            return event
        is_changed = False
        if self.strip_usage and isinstance(payload.get("usage"), dict):
            if not payload.get("choices"):
                return None
            payload.pop("usage")
            is_changed = True
        if self.redactor is not None:
            is_changed = _redact_choices(self.redactor, payload) or is_changed
        return b"data: " + orjson.dumps(payload) if is_changed else event

    def flush(self, template: dict[str, Any] | None) -> bytes | None:
        """A final chunk with any text (and log-probabilities) the redactor still holds (stream
        ended without finish)."""
        if self.redactor is None:
            return None
        leftovers = self.redactor.flush()
        logprobs = self.redactor.logprobs.flush()
        if not leftovers and not logprobs:
            return None
        base = {k: v for k, v in (template or {}).items() if k not in ("choices", "usage")}
        is_chat = (template or {}).get("object", "").startswith("chat")
        choices = []
        for i in sorted(set(leftovers) | set(logprobs)):
            text = leftovers.get(i, "")
            choice = {"index": i, "delta": {"content": text}} if is_chat else {"index": i, "text": text}
            choices.append({**choice, "logprobs": logprobs[i]} if i in logprobs else choice)
        return b"data: " + orjson.dumps({**base, "choices": choices})


def _redact_choices(redactor: StreamRedactor, payload: dict[str, Any]) -> bool:
    is_changed = False
    for choice in payload.get("choices") or []:
        index = choice.get("index", 0)
        is_final = choice.get("finish_reason") is not None
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            delta["content"] = redactor.feed(index, delta["content"], is_final)
            is_changed = True
        elif isinstance(choice.get("text"), str):
            choice["text"] = redactor.feed(index, choice["text"], is_final)
            is_changed = True
        elif is_final:
            held = redactor.feed(index, "", True)
            if held:
                if isinstance(delta, dict):
                    delta["content"] = held
                else:
                    choice["text"] = held
                is_changed = True
        logprobs = choice.get("logprobs")
        if logprobs is not None or is_final:  # held-back entries travel with the held-back text
            released = redactor.logprobs.feed(index, logprobs, is_final)
            if released is not None or logprobs is not None:
                choice["logprobs"] = released
                is_changed = True
    return is_changed


def event_payload(event: bytes) -> dict[str, Any] | None:
    """The JSON object of a `data:` event, or None for [DONE], comments and non-JSON data."""
    if not event.startswith(b"data:"):
        return None
    data = event[5:].strip()
    if not data.startswith(b"{"):
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None
