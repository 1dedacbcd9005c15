"""Structured outputs and tool calls through a real gateway, with the `openai` SDK unchanged: the
gateway passes response_format, tools and tool_choice through, and its refusals stay the server's."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.gateway.conftest import base_config
from tests.structured.conftest import MODEL
from tests.structured.test_response_format import JSON_SCHEMA_FORMAT, MESSAGES, SCHEMA
from tests.structured.test_tools import SCHEMAS, TOOLS


@pytest.fixture
def gateway_client(demo_server, gateway_factory, tmp_path: Path) -> openai.OpenAI:
    # Long timeouts: a 300-token answer on a busy 2-core machine outlasts the fault tests' 30 s.
    config = base_config(tmp_path, [{"name": MODEL, "backends": [{"url": demo_server.url}]}],
                         timeouts={"first_byte": 120.0, "total": 600.0})
    gateway = gateway_factory(config)
    key = gateway.admin("POST", "/admin/keys", json={"name": "structured"}).json()["key"]
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_json_schema_and_tool_calls_through_the_gateway(gateway_client):
    reply = gateway_client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=JSON_SCHEMA_FORMAT,
                                                   max_tokens=300, temperature=0.9, seed=2)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)

    text = ""
    for chunk in gateway_client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=300,
                                                        response_format=JSON_SCHEMA_FORMAT, temperature=0.9, seed=3):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)

    calls: dict[int, dict] = {}
    for chunk in gateway_client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, tools=TOOLS,
                                                        tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                                                        temperature=0):
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"name": piece.function.name, "arguments": ""})
                call["arguments"] += piece.function.arguments or ""
    assert calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_a_bad_schema_is_the_servers_400_through_the_gateway(gateway_client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as raised:
        gateway_client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=bad)
    assert raised.value.status_code == 400 and "Invalid JSON schema" in str(raised.value)
