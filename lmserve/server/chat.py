"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lmserve.engine.sampler import TokenLogprobs
from lmserve.engine.sampling_params import StructuredOutputs
from lmserve.engine.tokenizer import Tokenizer
from lmserve.server.errors import bad_request
from lmserve.server.generation import Delta, Generation, merge
from lmserve.server.identity import identity_of
from lmserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    ToolCall,
    TopLogprob,
)
from lmserve.server.serving import (
    Accounting,
    check_model,
    chunk_usage,
    json_response,
    max_tokens_for,
    new_request_id,
    respond,
    sampling_params,
    sse,
    usage_of,
)
from lmserve.server.state import ServerState
from lmserve.server.tool_calls import (
    AutoCallWriter,
    ChoiceWriter,
    ForcedCallWriter,
    TextWriter,
    forced_call_schema,
    merge_deltas,
)


def encode_messages(body: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """The prompt: the messages (with earlier tool calls and results) and the tools, rendered by
    the model's chat template as Hugging Face passes them (`tools=`, arguments as objects)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        text = tokenizer.render_chat(
            [template_message(m) for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **({"tools": tools} if tools else {}),
            **(body.chat_template_kwargs or {}),
        )
    except Exception as exc:  # template errors (jinja raise_exception, bad roles) are the client's to fix
        raise bad_request(f"the chat template could not render these messages: {exc}", param="messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the messages render to an empty prompt", param="messages")
    return ids


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: tool call arguments as objects (templates write them
    with `tojson`), the answered call's id on tool messages."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments: Any = json.loads(call.function.arguments)
            except ValueError:
                arguments = call.function.arguments
            calls.append({"id": call.id, "type": call.type,
                          "function": {"name": call.function.name, "arguments": arguments}})
        rendered["tool_calls"] = calls
    return rendered


def structured_outputs(body: ChatCompletionRequest) -> StructuredOutputs | None:
    """The grammar's schema: the forced tool calls (required, named), else the response_format."""
    mode = body.tool_mode()
    if mode is None or mode == "auto":
        return body.response_format.structured_outputs() if body.response_format else None
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools or []]
    if mode != "required":
        functions = [f for f in functions if f["name"] == mode]
    parallel = body.parallel_tool_calls and mode == "required"
    return StructuredOutputs.from_schema(forced_call_schema(functions, parallel), origin="tools")


def choice_writer(body: ChatCompletionRequest) -> ChoiceWriter:
    mode = body.tool_mode()
    if mode is None:
        return TextWriter()
    if mode == "auto":
        return AutoCallWriter({t.function.name for t in body.tools or []}, body.parallel_tool_calls)
    return ForcedCallWriter()


def finish_reason_of(body: ChatCompletionRequest, writer: ChoiceWriter, reason: str | None) -> str | None:
    """OpenAI's: tool_calls when the model called tools of its own choice or as required; stop
    when it called the function tool_choice named (as OpenAI answers that case)."""
    if reason == "stop" and writer.has_tool_calls and body.tool_mode() in ("auto", "required"):
        return "tool_calls"
    return reason


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprobs], top: int) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> TopLogprob:
        text = tokenizer.token_text(token_id)
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode("utf-8")))

    content = []
    for lp in logprobs:
        head = entry(lp.token_id, lp.logprob)
        content.append(ChatTokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes,
                                        top_logprobs=[entry(t, v) for t, v in lp.top[:top]]))
    return ChatLogprobs(content=content)


async def create_chat_completion(body: ChatCompletionRequest, http: Request, state: ServerState) -> Response:
    check_model(state, body.model)
    engine, tokenizer = state.require_ready()
    prompt = encode_messages(body, tokenizer)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = body.top_logprobs or 0
    params = sampling_params(state, body, max_tokens_for(state, len(prompt), requested), top if body.logprobs else None,
                             structured=structured_outputs(body))
    request_id = new_request_id("chatcmpl")
    identity = identity_of(body, http, state.options)
    generation = Generation(engine, tokenizer, request_id, prompt, params, identity.priority, identity.tenant)
    created = int(time.time())
    accounting = Accounting(state, [generation], identity.tenant, identity.priority)
    writers = [choice_writer(body) for _ in range(body.n)]

    so_far = chunk_usage(body.stream_options, [generation])

    def chunk(choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> bytes:
        payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                   "model": state.model_name, "choices": choices}
        if with_usage:
            payload["usage"] = usage if usage is not None else so_far()
        return sse(payload)

    def choice_deltas(d: Delta) -> list[dict]:
        """The choice's OpenAI deltas for what the engine gave (the last one carries the logprobs)."""
        deltas = writers[d.index].push(d.text) + (writers[d.index].finish() if d.finish_reason else [])
        logprobs = chat_logprobs(tokenizer, d.logprobs, top).model_dump() if body.logprobs and d.logprobs else None
        if logprobs is not None and not deltas:  # a token that completes no character yet
            deltas = [{"content": ""}]
        return [{"index": d.index, "delta": delta, "logprobs": logprobs if i == len(deltas) - 1 else None,
                 "finish_reason": None} for i, delta in enumerate(deltas)]

    async def events() -> AsyncIterator[bytes]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        for index in range(body.n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], with_usage=include_usage)
        async for d in merge([generation]):
            for choice in choice_deltas(d):
                yield chunk([choice], with_usage=include_usage)
            if d.finish_reason:
                reason = finish_reason_of(body, writers[d.index], d.finish_reason)
                yield chunk([{"index": d.index, "delta": {}, "logprobs": None, "finish_reason": reason}],
                            with_usage=include_usage)
        if include_usage:
            yield chunk([], usage_of([generation]).model_dump(), with_usage=True)

    async def collect() -> Response:
        deltas: list[list[dict]] = [[] for _ in range(body.n)]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in range(body.n)]
        reasons: list[str | None] = [None] * body.n
        async for d in generation.deltas():
            deltas[d.index] += [c["delta"] for c in choice_deltas(d)]
            logprobs[d.index].extend(d.logprobs)
            reasons[d.index] = d.finish_reason or reasons[d.index]
        choices = []
        for i in range(body.n):
            content, tool_calls = merge_deltas(deltas[i])
            message = AssistantMessage(content=content if content is not None or tool_calls else "",
                                       tool_calls=[ToolCall.model_validate(c) for c in tool_calls or []] or None)
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish_reason_of(body, writers[i], reasons[i]),
                                      logprobs=chat_logprobs(tokenizer, logprobs[i], top) if body.logprobs else None))
        return json_response(ChatCompletionResponse(id=request_id, created=created, model=state.model_name,
                                                    choices=choices, usage=usage_of([generation])).as_openai())

    return await respond(http, accounting, body.stream, events, collect)
