"""`tools`, `tool_choice` and `parallel_tool_calls` with the official `openai` SDK against a real server:
forced calls (required, named) follow the functions' schemas, streamed as OpenAI streams them;
`none` and `auto` answer in prose on the demo model; the template receives tools and tool turns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from tests.structured.conftest import MODEL

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 10}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def stream_calls(client, **kwargs) -> tuple[str | None, list[dict], str | None]:
    """(content, tool calls, finish reason) accumulated from a stream, checking each delta's shape."""
    content, calls, finish = None, {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            if choice.delta.content:
                content = (content or "") + choice.delta.content
            for piece in choice.delta.tool_calls or []:
                if piece.index not in calls:  # OpenAI's first delta of a call: id, type, name
                    assert piece.id.startswith("call_") and piece.type == "function" and piece.function.name
                    calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
                else:
                    assert piece.id is None and not piece.function.name
                calls[piece.index]["arguments"] += piece.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], finish


def check_calls(calls: list[dict]) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def whole_calls(choice) -> list[dict]:
    assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls)
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]


def test_a_required_call_follows_its_schema_streamed_or_not(demo_client):
    kwargs = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=300, temperature=0)
    choice = demo_client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = whole_calls(choice)
    assert len(calls) == 1
    check_calls(calls)
    content, streamed, finish = stream_calls(demo_client, **kwargs)
    assert finish == "tool_calls" and content is None
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c["name"], c["arguments"]) for c in calls]


def test_parallel_required_calls_each_follow_their_schema(demo_client):
    """The demo model never closes the array of calls (a model that knows tools does), so the
    answer ends at max_tokens: every call but the cut last one is complete and valid."""
    kwargs = dict(tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0.8, seed=1)
    choice = demo_client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs).choices[0]
    calls = whole_calls(choice)
    assert choice.finish_reason == "length" and len(calls) > 1
    check_calls(calls[:-1])
    _, streamed, _ = stream_calls(demo_client, **kwargs)
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c["name"], c["arguments"]) for c in calls]


def test_sampled_required_calls_follow_the_schemas(demo_client):
    reply = demo_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, max_tokens=300, temperature=1.2, seed=4, n=3)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls([{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_named_function_is_called_once(demo_client, stream):
    kwargs = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=300,
                  temperature=0.9, seed=8)
    if stream:
        content, calls, finish = stream_calls(demo_client, **kwargs)
    else:
        choice = demo_client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs).choices[0]
        content, finish = choice.message.content, choice.finish_reason
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
    assert finish == "stop" and content is None  # OpenAI answers a named tool_choice with finish_reason stop
    assert [c["name"] for c in calls] == ["get_time"]
    check_calls(calls)


@pytest.mark.parametrize("tool_choice", ["none", "auto"])
def test_none_and_auto_answer_in_prose_on_the_demo_model(demo_client, tool_choice):
    reply = demo_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                                max_tokens=40, temperature=0)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    content, calls, _ = stream_calls(demo_client, tools=TOOLS, tool_choice=tool_choice, max_tokens=40, temperature=0)
    assert calls == [] and content == choice.message.content


def test_a_named_function_must_be_among_the_tools(demo_client):
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        demo_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                            tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in str(raised.value)


TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools: {{ tools | tojson }}{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|user|>\n<tool_response>{{ message['content'] }}</tool_response>"
    "{{ eos_token }}\n"
    "{% elif message.get('tool_calls') %}<|assistant|>\n{% for call in message['tool_calls'] %}"
    "<tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}{{ eos_token }}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory) -> Path:
    """The demo model with a chat template that renders tools, tool calls and tool results."""
    import lmserve.demo_model

    path = tmp_path_factory.mktemp("demo-with-tools")
    shutil.copytree(Path(lmserve.demo_model.__file__).parent, path, dirs_exist_ok=True)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    return path


def test_the_template_receives_tools_and_tool_turns(start_server, tools_model):
    from openai import OpenAI
    from transformers import AutoTokenizer

    server = start_server(model=tools_model)
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    conversation = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, max_tokens=5,
                                           temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(tools_model)
    rendered = [dict(m) for m in conversation]
    rendered[1] = {**rendered[1], "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "unit": "celsius"}}}]}
    text = tokenizer.apply_chat_template(rendered, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "get_time" in text and '"arguments": {"city": "Paris"' in text and "Sunny, 21 degrees" in text
    assert reply.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    without_tools = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=5, temperature=0)
    assert without_tools.usage.prompt_tokens < reply.usage.prompt_tokens
