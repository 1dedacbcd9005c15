"""`response_format` json_object and json_schema with the official `openai` SDK against a real server
on the demo model: the answer parses and validates, streamed or not; bad schemas are a 400."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.structured.conftest import MODEL

MESSAGES = [{"role": "user", "content": "Tell me about a cat."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "mood": {"enum": ["happy", "sleepy", "grumpy"]},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 1, "maximum": 120}, "likes_cats": {"type": "boolean"}},
            "required": ["age", "likes_cats"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "mood", "toys", "owner"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}}


def chat(client, stream: bool, **kwargs) -> tuple[list[str], list[str | None]]:
    """(text, finish reason) of every choice."""
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)
        return [c.message.content for c in reply.choices], [c.finish_reason for c in reply.choices]
    n = kwargs.get("n", 1)
    texts, reasons = [""] * n, [None] * n
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return texts, reasons


def test_the_demo_model_does_not_write_json_by_itself(demo_client):
    (text,), _ = chat(demo_client, False, max_tokens=60, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_schema_answers_validate(demo_client, stream):
    texts, reasons = chat(demo_client, stream, response_format=JSON_SCHEMA_FORMAT, max_tokens=300,
                          temperature=1.0, seed=11, n=3)
    assert reasons == ["stop"] * 3
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_streamed_and_whole_answers_are_the_same_json(demo_client):
    whole, _ = chat(demo_client, False, response_format=JSON_SCHEMA_FORMAT, max_tokens=300, temperature=0)
    streamed, _ = chat(demo_client, True, response_format=JSON_SCHEMA_FORMAT, max_tokens=300, temperature=0)
    assert whole == streamed
    jsonschema.validate(json.loads(whole[0]), SCHEMA)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_object_answers_parse_as_objects(client, stream):
    """On the tiny random test model (`client`): the demo model, asked for any JSON object, opens a
    string key and writes prose into it past any max_tokens (finish reason length, as OpenAI's
    would), so it cannot show a complete answer."""
    texts, reasons = chat(client, stream, response_format={"type": "json_object"}, max_tokens=100,
                          temperature=0.8, seed=5, n=2)
    assert reasons == ["stop", "stop"]
    assert all(isinstance(json.loads(text), dict) for text in texts)


def test_completions_take_response_format_as_an_extension(demo_client):
    reply = demo_client.completions.create(model=MODEL, prompt="A cat:", max_tokens=300, temperature=0.7, seed=3,
                                           extra_body={"response_format": JSON_SCHEMA_FORMAT})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)


@pytest.mark.parametrize("response_format, fragment", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "no-such-type"}}}}}, "Invalid JSON schema"),
    ({"type": "json_schema"}, "needs a json_schema object"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "name"),
    ({"type": "yaml"}, "response_format"),
])
def test_bad_response_formats_are_400_naming_the_field(demo_server, response_format, fragment):
    r = httpx.post(demo_server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MESSAGES, "response_format": response_format})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"].startswith("response_format") and fragment in error["message"]


def test_the_server_still_serves_after_a_bad_schema(demo_client, demo_server):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    assert httpx.post(demo_server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "x", "response_format": bad}).status_code == 400
    texts, _ = chat(demo_client, False, response_format=JSON_SCHEMA_FORMAT, max_tokens=300, temperature=0)
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
