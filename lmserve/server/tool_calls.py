"""Tool calls in chat completions: from generated text to OpenAI's `tool_calls`, streamed or not.

Each choice's text goes through a writer that turns it into OpenAI delta objects (`{"content": ...}`
or `{"tool_calls": [...]}`); a streamed answer sends them as they come, a whole answer merges them
(`merge_deltas`), so both always say the same.

- `TextWriter`: plain content (no tools, or `tool_choice` none).
- `ForcedCallWriter` (`tool_choice` required or a named function): the grammar (`forced_call_schema`)
  makes the model write `[{"name": ..., "arguments": {...}}, ...]`; each call is announced as soon as
  its name is complete, then its arguments follow in pieces, as OpenAI streams them.
- `AutoCallWriter` (`tool_choice` auto): the model may answer or call tools in its own format,
  Hermes/Qwen (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`) or Llama 3.x (the whole
  answer is `{"name": ..., "parameters": ...}`, maybe after `<|python_tag|>`). Text that may start a
  call is held back until the answer ends; calls are then sent whole, and text that does not parse
  as calls of the request's tools is sent as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|$)", re.DOTALL)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def forced_call_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of `[{"name": ..., "arguments": ...}]` over `functions` (OpenAI function
    definitions): one call, or one or more when `parallel`."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": function_parameters(f)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def function_parameters(function: dict[str, Any]) -> dict[str, Any]:
    """The schema of a function's arguments: an object (OpenAI's default when none is given)."""
    parameters = function.get("parameters")
    return {"type": "object", "properties": {}} if parameters is None else parameters


class ChoiceWriter(Protocol):
    @property
    def has_tool_calls(self) -> bool:
        """The choice called tools (its deltas hold tool_calls)."""
        ...

    def push(self, text: str) -> list[dict[str, Any]]:
        """The delta objects `text` (the choice's next piece) makes ready to send."""
        ...

    def finish(self) -> list[dict[str, Any]]:
        """The delta objects still held when the choice ends."""
        ...


class TextWriter:
    has_tool_calls = False

    def push(self, text: str) -> list[dict[str, Any]]:
        return [{"content": text}] if text else []

    def finish(self) -> list[dict[str, Any]]:
        return []


@dataclass
class _Call:
    name: str | None = None
    arguments: str = ""
    num_sent: int = 0
    """Characters of `arguments` already sent."""
    id: str | None = None
    """Set when the call was announced."""


class ForcedCallWriter:
    """Reads the forced `[{"name": ..., "arguments": ...}, ...]` as it is generated.

    Invariant: outside an arguments value, `depth` is the JSON nesting (1 in the array, 2 in a call
    object); inside one, `_args_depth` is its nesting and every character goes to the call's
    arguments.
    """

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.depth = 0
        self._in_string = self._escaped = False
        self._string: list[str] = []
        self._key: str | None = None
        self._expect_value = False
        self._args_depth = 0

    @property
    def has_tool_calls(self) -> bool:
        return any(c.id is not None for c in self.calls)

    def push(self, text: str) -> list[dict[str, Any]]:
        for char in text:
            if self._args_depth:
                self._feed_arguments(char)
            elif self._in_string:
                self._feed_string(char)
            else:
                self._feed_structure(char)
        return self._ready()

    def finish(self) -> list[dict[str, Any]]:
        return self._ready()

    def _feed_string(self, char: str) -> None:
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            self._in_string = False
            value = json.loads('"' + "".join(self._string) + '"')
            if self.depth == 2 and not self._expect_value:
                self._key = value
            elif self.depth == 2 and self._key == "name":
                self.calls[-1].name = value
            return
        self._string.append(char)

    def _feed_structure(self, char: str) -> None:
        if char == '"':
            self._in_string, self._string = True, []
        elif char == "[" and self.depth == 0:
            self.depth = 1
        elif char == "{" and self.depth == 1:
            self.depth, self._key, self._expect_value = 2, None, False
            self.calls.append(_Call())
        elif char == "{" and self.depth == 2 and self._expect_value and self._key == "arguments":
            self._args_depth = 1
            self.calls[-1].arguments += char
        elif char == ":":
            self._expect_value = True
        elif char == ",":
            self._expect_value = False
        elif char == "}" and self.depth == 2:
            self.depth = 1
        elif char == "]" and self.depth == 1:
            self.depth = 0

    def _feed_arguments(self, char: str) -> None:
        self.calls[-1].arguments += char
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._args_depth += 1
        elif char in "}]":
            self._args_depth -= 1
            if not self._args_depth:
                self._expect_value = False

    def _ready(self) -> list[dict[str, Any]]:
        """A call is announced (id, type, name) once its name is known; its arguments follow."""
        deltas = []
        for index, call in enumerate(self.calls):
            if call.name is None:
                break  # calls are announced in order
            if call.id is None:
                call.id = new_tool_call_id()
                deltas.append(_tool_delta(index, id=call.id, type="function",
                                          function={"name": call.name, "arguments": ""}))
            if len(call.arguments) > call.num_sent:
                deltas.append(_tool_delta(index, function={"arguments": call.arguments[call.num_sent:]}))
                call.num_sent = len(call.arguments)
        return deltas


def _tool_delta(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **fields}]}


class AutoCallWriter:
    """Content as it comes, except text that may be (the start of) a tool call, held to the end."""

    def __init__(self, tool_names: set[str], parallel: bool) -> None:
        self.tool_names = tool_names
        self.parallel = parallel
        self.has_tool_calls = False
        self._text = ""
        self._num_sent = 0

    def push(self, text: str) -> list[dict[str, Any]]:
        self._text += text
        held = self._hold_from()
        if held <= self._num_sent:
            return []
        piece, self._num_sent = self._text[self._num_sent:held], held
        return [{"content": piece}]

    def _hold_from(self) -> int:
        """Where the text that may still become a tool call starts."""
        text = self._text
        stripped = text.lstrip()
        if self._num_sent == 0 and (
            not stripped or stripped[0] in "{[" or stripped.startswith(PYTHON_TAG)
            or PYTHON_TAG.startswith(stripped) or HERMES_OPEN.startswith(stripped)
        ):
            return 0  # a Llama-style call is the whole answer: wait for all of it
        found = text.find(HERMES_OPEN, self._num_sent)
        if found >= 0:
            return found
        for size in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
            if HERMES_OPEN.startswith(text[-size:]):
                return len(text) - size
        return len(text)

    def finish(self) -> list[dict[str, Any]]:
        held = self._text[self._num_sent:]
        self._num_sent = len(self._text)
        parsed = parse_tool_calls(held, self.tool_names)
        if not parsed:
            return [{"content": held}] if held else []
        content, calls = parsed
        calls = calls if self.parallel else calls[:1]
        self.has_tool_calls = True
        deltas: list[dict[str, Any]] = [{"content": content}] if content.strip() else []
        for index, (name, arguments) in enumerate(calls):
            deltas.append(_tool_delta(index, id=new_tool_call_id(), type="function",
                                      function={"name": name, "arguments": ""}))
            deltas.append(_tool_delta(index, function={"arguments": arguments}))
        return deltas


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str, list[tuple[str, str]]] | None:
    """(content before the calls, [(name, arguments JSON)]) when `text` holds calls of known tools
    in the Hermes/Qwen or Llama 3.x format; None when it is plain content."""
    if HERMES_OPEN in text:
        content = text[: text.index(HERMES_OPEN)]
        objects = [_json_or_none(m.group(1)) for m in _HERMES_CALL.finditer(text)]
    else:
        content, objects = "", _json_sequence(text.strip().removeprefix(PYTHON_TAG))
    calls = []
    for call in objects:
        if not isinstance(call, dict) or call.get("name") not in tool_names:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string already
            arguments = _json_or_none(arguments)
        if not isinstance(arguments, dict):
            return None
        calls.append((call["name"], json.dumps(arguments, ensure_ascii=False)))
    return (content, calls) if calls else None


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_sequence(text: str) -> list[Any]:
    """The JSON objects of `{...}; {...}` (Llama 3.x writes parallel calls so); [None] when the
    text is anything else."""
    decoder, position = json.JSONDecoder(), 0
    objects: list[Any] = []
    while True:
        while position < len(text) and text[position] in " \t\r\n;":
            position += 1
        if position == len(text):
            return objects
        if text[position] != "{":
            return [None]
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError:
            return [None]
        objects.append(value)


def merge_deltas(deltas: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls) of a whole message from its deltas, as a client accumulates them."""
    content: str | None = None
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if "content" in delta:
            content = (content or "") + delta["content"]
        for piece in delta.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"id": None, "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
            call["id"] = piece.get("id", call["id"])
            function = piece.get("function", {})
            call["function"]["name"] += function.get("name", "")
            call["function"]["arguments"] += function.get("arguments", "")
    tool_calls = [calls[i] for i in sorted(calls)] or None
    return content, tool_calls
