"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from lmserve.engine.sampler import TokenLogprobs
from lmserve.engine.tokenizer import Tokenizer
from lmserve.server.errors import bad_request
from lmserve.server.generation import Generation, merge
from lmserve.server.identity import identity_of
from lmserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
)
from lmserve.server.serving import (
    Accounting,
    check_model,
    json_response,
    max_tokens_for,
    new_request_id,
    respond,
    sampling_params,
    sse,
    usage_of,
)
from lmserve.server.state import ServerState


def encode_messages(body: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.render_chat(
            messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **(body.chat_template_kwargs or {}),
        )
    except Exception as exc:  # template errors (jinja raise_exception, bad roles) are the client's to fix
        raise bad_request(f"the chat template could not render these messages: {exc}", param="messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the messages render to an empty prompt", param="messages")
    return ids


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
    params = sampling_params(state, body, max_tokens_for(state, len(prompt), requested), top if body.logprobs else None)
    request_id = new_request_id("chatcmpl")
    identity = identity_of(body, http, state.options)
    generation = Generation(engine, tokenizer, request_id, prompt, params, identity.priority, identity.tenant)
    created = int(time.time())
    accounting = Accounting(state, [generation], identity.tenant, identity.priority)

    def chunk(choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> bytes:
        payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                   "model": state.model_name, "choices": choices}
        if with_usage:
            payload["usage"] = usage
        return sse(payload)

    async def events() -> AsyncIterator[bytes]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        for index in range(body.n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], with_usage=include_usage)
        async for d in merge([generation]):
            logprobs = chat_logprobs(tokenizer, d.logprobs, top).model_dump() if body.logprobs else None
            if d.text or logprobs:
                yield chunk([{"index": d.index, "delta": {"content": d.text}, "logprobs": logprobs,
                              "finish_reason": None}], with_usage=include_usage)
            if d.finish_reason:
                yield chunk([{"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}],
                            with_usage=include_usage)
        if include_usage:
            yield chunk([], usage_of([generation]).model_dump(), with_usage=True)

    async def collect() -> Response:
        texts = ["" for _ in range(body.n)]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in range(body.n)]
        reasons: list[str | None] = [None] * body.n
        async for d in generation.deltas():
            texts[d.index] += d.text
            logprobs[d.index].extend(d.logprobs)
            reasons[d.index] = d.finish_reason or reasons[d.index]
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=texts[i]),
                       logprobs=chat_logprobs(tokenizer, logprobs[i], top) if body.logprobs else None,
                       finish_reason=reasons[i])
            for i in range(body.n)
        ]
        response = ChatCompletionResponse(id=request_id, created=created, model=state.model_name,
                                          choices=choices, usage=usage_of([generation]))
        return json_response(response.model_dump())

    return await respond(http, accounting, body.stream, events, collect)
