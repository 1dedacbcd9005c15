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
from lmserve.server.identity import identity_of
from lmserve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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


def completion_logprobs(
    tokenizer: Tokenizer, logprobs: list[TokenLogprobs], offset: int,
    prompt: tuple[list[int], list[TokenLogprobs | None]] | None = None,
) -> CompletionLogprobs:
    """OpenAI's legacy per-token layout; `offset` is where the text starts in the choice. With
    `prompt` (echo), the prompt's tokens come first; the very first has no log-probability."""
    out = CompletionLogprobs()
    entries: list[tuple[int, TokenLogprobs | None]] = []
    if prompt is not None:
        entries += list(zip(prompt[0], prompt[1]))
    entries += [(lp.token_id, lp) for lp in logprobs]
    for token_id, lp in entries:
        token = tokenizer.token_text(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(None if lp is None else {tokenizer.token_text(t): v for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(token)
    return out


async def create_completion(body: CompletionRequest, http: Request, state: ServerState) -> Response:
    check_model(state, body.model)
    engine, tokenizer = state.require_ready()
    prompts = encode_prompts(body, tokenizer)
    request_id = new_request_id("cmpl")
    identity = identity_of(body, http, state.options)
    generations = []
    for i, (_, ids) in enumerate(prompts):
        prompt_logprobs = body.logprobs if body.echo else None
        structured = body.response_format.structured_outputs() if body.response_format else None
        params = sampling_params(state, body, max_tokens_for(state, len(ids), body.max_tokens), body.logprobs,
                                 prompt_logprobs, structured)
        generations.append(Generation(engine, tokenizer, f"{request_id}-{i}", ids, params,
                                      identity.priority, identity.tenant, index_offset=i * body.n))
    created = int(time.time())
    accounting = Accounting(state, generations, identity.tenant, identity.priority)

    so_far = chunk_usage(body.stream_options, generations)

    def chunk(choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> bytes:
        payload = {"id": request_id, "object": "text_completion", "created": created, "model": state.model_name,
                   "choices": choices}
        if with_usage:
            payload["usage"] = usage if usage is not None else so_far()
        return sse(payload)

    def echo_of(index: int) -> tuple[str, tuple[list[int], list] | None]:
        """The prompt text to echo (decoded only once the engine has accepted the token ids)."""
        if not body.echo:
            return "", None
        generation = generations[index // body.n]
        text, ids = prompts[index // body.n]
        prompt = None
        if body.logprobs is not None and generation.prompt_logprobs is not None:
            prompt = (generation.prompt_token_ids, generation.prompt_logprobs)
        return (text if text is not None else tokenizer.decode(ids)), prompt

    async def events() -> AsyncIterator[bytes]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = [0] * (len(prompts) * body.n)
        echoed = [not body.echo] * len(offsets)
        async for d in merge(generations):
            if not echoed[d.index]:  # the echo goes first, with the prompt's log-probabilities if asked
                echoed[d.index] = True
                echo, prompt = echo_of(d.index)
                lp = completion_logprobs(tokenizer, [], 0, prompt).model_dump() if prompt else None
                offsets[d.index] = len(echo)
                yield chunk([{"index": d.index, "text": echo, "logprobs": lp, "finish_reason": None}],
                            with_usage=include_usage)
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
            echo, prompt = echo_of(index)
            lp = completion_logprobs(tokenizer, logprobs[index], 0, prompt) if body.logprobs is not None else None
            choices.append(CompletionChoice(index=index, text=echo + text, logprobs=lp, finish_reason=reasons[index]))
        response = CompletionResponse(id=request_id, created=created, model=state.model_name, choices=choices,
                                      usage=usage_of(generations))
        return json_response(response.model_dump(exclude_none=False))

    return await respond(http, accounting, body.stream, events, collect)
