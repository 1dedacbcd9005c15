"""POST /v1/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from lmserve.engine.sampler import TokenLogprobs
from lmserve.engine.tokenizer import Tokenizer
from lmserve.server.errors import bad_request
from lmserve.server.generation import Generation, merge
from lmserve.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from lmserve.server.serving import (
    Accounting, check_model, json_response, max_tokens_for, new_request_id, priority_of, respond,
    sampling_params, sse, tenant_of, usage_of,
)
from lmserve.server.state import ServerState


def encode_prompts(body: CompletionRequest, tokenizer: Tokenizer) -> list[tuple[str | None, list[int]]]:
    """Each prompt as (text or None, token ids)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty", param="prompt")
    encoded = []
    for item in items:
        ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        encoded.append((item if isinstance(item, str) else None, ids))
    return encoded


def completion_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
    """OpenAI's legacy per-token layout; `offset` is where the delta's text starts in the choice."""
    out = CompletionLogprobs()
    for lp in logprobs:
        token = tokenizer.token_text(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({tokenizer.token_text(t): v for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(token)
    return out


async def create_completion(body: CompletionRequest, http: Request, state: ServerState) -> Response:
    check_model(state, body.model)
    engine, tokenizer = state.require_ready()
    if body.echo and body.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported", param="echo")
    prompts = encode_prompts(body, tokenizer)
    request_id = new_request_id("cmpl")
    tenant = tenant_of(body, http)
    generations = []
    for i, (_, ids) in enumerate(prompts):
        params = sampling_params(body, max_tokens_for(state, len(ids), body.max_tokens), body.logprobs)
        generations.append(Generation(engine, tokenizer, f"{request_id}-{i}", ids, params,
                                      priority_of(body, http), tenant, index_offset=i * body.n))
    echoes = [(text if text is not None else tokenizer.decode(ids)) if body.echo else "" for text, ids in prompts]
    created = int(time.time())
    accounting = Accounting(state, generations, tenant)

    def chunk(choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> bytes:
        payload = {"id": request_id, "object": "text_completion", "created": created, "model": state.model_name,
                   "choices": choices}
        if with_usage:
            payload["usage"] = usage
        return sse(payload)

    async def events() -> AsyncIterator[bytes]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = [0] * (len(prompts) * body.n)
        for index in range(len(offsets)):
            echo = echoes[index // body.n]
            if echo:
                offsets[index] = len(echo)
                yield chunk([{"index": index, "text": echo, "logprobs": None, "finish_reason": None}],
                            with_usage=include_usage)
        async for d in merge(generations):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, d.logprobs, offsets[d.index]).model_dump()
            offsets[d.index] += len(d.text)
            if d.text or d.finish_reason or logprobs:
                yield chunk([{"index": d.index, "text": d.text, "logprobs": logprobs,
                              "finish_reason": d.finish_reason}], with_usage=include_usage)
        if include_usage:
            yield chunk([], usage_of(generations).model_dump(), with_usage=True)

    async def collect() -> Response:
        texts = ["" for _ in range(len(prompts) * body.n)]
        logprobs = [[] for _ in texts]
        reasons: list[str | None] = [None for _ in texts]
        async for d in merge(generations):
            texts[d.index] += d.text
            logprobs[d.index].extend(d.logprobs)
            reasons[d.index] = d.finish_reason or reasons[d.index]
        choices = []
        for index, text in enumerate(texts):
            echo = echoes[index // body.n]
            lp = completion_logprobs(tokenizer, logprobs[index], len(echo)) if body.logprobs is not None else None
            choices.append(CompletionChoice(index=index, text=echo + text, logprobs=lp, finish_reason=reasons[index]))
        response = CompletionResponse(id=request_id, created=created, model=state.model_name, choices=choices,
                                      usage=usage_of(generations))
        return json_response(response.model_dump(exclude_none=False))

    return await respond(http, accounting, body.stream, events, collect)
