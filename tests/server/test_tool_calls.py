"""From generated text to OpenAI tool calls (lmserve/server/tool_calls.py): the forced-call reader
announces each call before its arguments and loses no character however the text is split; the
auto parser finds Hermes/Qwen and Llama 3.x calls and leaves everything else as content."""

from __future__ import annotations

import json

import pytest

from lmserve.server.tool_calls import (
    AutoCallWriter,
    ForcedCallWriter,
    TextWriter,
    forced_call_schema,
    merge_deltas,
)

FORCED = ('[{"name":"get_weather","arguments":{"city":"Pa\\"ris {x}","days":[1,2],"opts":{"u":"c"}}},'
          '{"arguments":{"tz":"UTC"},"name":"get_time"}]')


def feed(writer, pieces: list[str]) -> list[dict]:
    deltas = []
    for piece in pieces:
        deltas += writer.push(piece)
    return deltas + writer.finish()


@pytest.mark.parametrize("size", [1, 3, 7, len(FORCED)])
def test_forced_calls_are_announced_then_streamed_whatever_the_split(size):
    pieces = [FORCED[i:i + size] for i in range(0, len(FORCED), size)]
    writer = ForcedCallWriter()
    deltas = feed(writer, pieces)
    content, calls = merge_deltas(deltas)
    assert content is None and writer.has_tool_calls
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    expected = json.loads(FORCED)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [e["arguments"] for e in expected]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    seen: set[int] = set()
    for delta in deltas:
        (piece,) = delta["tool_calls"]
        if piece["index"] not in seen:  # the first delta of a call carries id, type and the whole name
            assert piece["id"] and piece["type"] == "function" and piece["function"]["arguments"] == ""
            seen.add(piece["index"])
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}


def test_an_unfinished_forced_call_keeps_what_was_generated():
    writer = ForcedCallWriter()
    content, calls = merge_deltas(feed(writer, ['[{"name":"f","argu', 'ments":{"a":"x']))
    assert calls == [{"id": calls[0]["id"], "type": "function", "function": {"name": "f", "arguments": '{"a":"x'}}]


def test_forced_call_schema_is_one_call_unless_parallel():
    functions = [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}},
                 {"name": "g"}]
    one = forced_call_schema(functions, parallel=False)
    assert one["maxItems"] == 1 and one["minItems"] == 1
    assert [c["properties"]["name"] for c in one["items"]["anyOf"]] == [{"const": "f"}, {"const": "g"}]
    assert one["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}}
    assert "maxItems" not in forced_call_schema(functions, parallel=True)


def auto(text: str, pieces: int = 1, parallel: bool = True) -> tuple[list[dict], AutoCallWriter]:
    writer = AutoCallWriter({"get_weather", "get_time"}, parallel)
    size = max(1, len(text) // pieces)
    return feed(writer, [text[i:i + size] for i in range(0, len(text), size)]), writer


@pytest.mark.parametrize("pieces", [1, 5, 200])
def test_auto_finds_hermes_calls_after_content(pieces):
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    deltas, writer = auto(text, pieces)
    content, calls = merge_deltas(deltas)
    assert writer.has_tool_calls and content == "Let me check. "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]


def test_auto_finds_llama_json_calls_and_honours_parallel_false():
    text = '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; {"name": "get_weather", "parameters": {}}'
    deltas, writer = auto(text, 4, parallel=False)
    content, calls = merge_deltas(deltas)
    assert content is None and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'}


@pytest.mark.parametrize("text", [
    "Just an answer, no tools.",
    '{"answer": 42}',  # JSON, but not a call
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not one of the request's tools
    "<tool_call>{not json</tool_call>",
    "   ",
])
def test_auto_leaves_anything_else_as_content(text):
    deltas, writer = auto(text, 3)
    content, calls = merge_deltas(deltas)
    assert not writer.has_tool_calls and calls is None
    assert (content or "") == text


def test_auto_streams_plain_content_at_once_and_holds_only_a_possible_tag():
    writer = AutoCallWriter({"f"}, True)
    assert writer.push("Hello") == [{"content": "Hello"}]
    assert writer.push(" world <tool") == [{"content": " world "}]
    assert writer.push("s are fun") == [{"content": "<tools are fun"}]
    assert writer.finish() == []


def test_text_writer_passes_content_through():
    assert merge_deltas(feed(TextWriter(), ["a", "", "b"])) == ("ab", None)
