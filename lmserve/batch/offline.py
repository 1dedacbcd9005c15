"""`lmserve batch run`: a batch input file through the engine directly, no server, no gateway.

The input and output are OpenAI's batch JSONL formats (jsonl.py), the response bodies the server's
(`chat.completion`, `text_completion`, built from the same protocol models). Every line is checked
before the model runs: a bad one is a `BatchInputError` naming it, and nothing is written.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmserve.batch.jsonl import BatchInputError, BatchLine, parse_input, response_line
from lmserve.engine.llm import LLM
from lmserve.engine.outputs import RequestOutput
from lmserve.engine.sampling_params import SamplingParams
from lmserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
)
from lmserve.server.sampling_defaults import read_sampling_defaults

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
URLS = (CHAT, COMPLETIONS)
CHUNK = 64
"""Requests handed to the engine at once (it batches them); the progress bar moves per chunk."""


@dataclass(frozen=True)
class Prepared:
    """A checked request: its line, parsed body, prompt token ids and sampling params."""

    line: BatchLine
    request: ChatCompletionRequest | CompletionRequest
    prompt_ids: list[int]
    params: SamplingParams


def _error(line: BatchLine, message: str) -> BatchInputError:
    # Lines are numbered among non-blank lines: the same number as the file's line when it has no blank ones.
    return BatchInputError(message, line.index + 1)


def _prompt(llm: LLM, line: BatchLine, request: ChatCompletionRequest | CompletionRequest) -> list[int]:
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise _error(line, f"{llm.engine.model_dir} has no tokenizer")
    if isinstance(request, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = tokenizer.render_chat(messages, add_generation_prompt=request.add_generation_prompt,
                                         continue_final_message=request.continue_final_message,
                                         **(request.chat_template_kwargs or {}))
        except Exception as exc:  # template errors (jinja raise_exception, bad roles) are the line's, as in the server
            raise _error(line, f"the chat template could not render these messages: {exc}") from None
        return tokenizer.encode(text, add_special_tokens=False)
    prompt = request.prompt
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # type: ignore[arg-type]
    raise _error(line, "`body.prompt` must be one string or one list of token ids in a batch")


def prepare(llm: LLM, line: BatchLine, defaults: dict[str, float]) -> Prepared:
    """Parses and checks one line against the loaded model; raises BatchInputError naming it."""
    try:
        request: ChatCompletionRequest | CompletionRequest = (
            ChatCompletionRequest.model_validate(line.body) if line.url == CHAT
            else CompletionRequest.model_validate(line.body))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise _error(line, f"body{'.' + where if where else ''}: {first['msg']}") from None
    if request.logprobs or (isinstance(request, CompletionRequest) and request.echo):
        raise _error(line, "logprobs and echo are not supported by `lmserve batch run`")
    try:
        ids = llm.engine.validate_prompt(_prompt(llm, line, request))
    except ValueError as exc:
        raise _error(line, str(exc)) from None
    limit = llm.engine.max_model_len
    requested = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        requested = request.max_completion_tokens
    if requested is not None and len(ids) + requested > limit:
        raise _error(line, f"{len(ids)} prompt tokens + max_tokens {requested} exceed max_model_len {limit}")
    try:
        params = request.sampling_params(requested if requested is not None else limit - len(ids), None,
                                         defaults=defaults)
    except ValueError as exc:
        raise _error(line, str(exc)) from None
    return Prepared(line, request, ids, params)


def response_body(item: Prepared, out: RequestOutput) -> dict[str, Any]:
    """The body the server would answer with for this request."""
    completion = sum(len(o.token_ids) for o in out.outputs)
    prompt = len(out.prompt_token_ids)
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                  prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens))
    created = int(time.time())
    if isinstance(item.request, ChatCompletionRequest):
        chat_choices = [ChatChoice(index=o.index, message=AssistantMessage(content=o.text), logprobs=None,
                                   finish_reason=o.finish_reason) for o in out.outputs]
        return ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=created, model=item.request.model,
                                      choices=chat_choices, usage=usage).as_openai()
    choices = [CompletionChoice(index=o.index, text=o.text, logprobs=None, finish_reason=o.finish_reason)
               for o in out.outputs]
    return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=created, model=item.request.model,
                              choices=choices, usage=usage).model_dump(exclude_none=False)


def _chunks(items: list[Prepared]) -> Iterator[list[Prepared]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


def run_file(input_path: Path, output_path: Path, llm: LLM, on_progress: Callable[[int, int], None]) -> int:
    """Runs every request of `input_path`, writes the output file; returns the number of requests.

    `on_progress(done, total)` is called after each chunk. Raises BatchInputError before anything
    runs when a line is bad.
    """
    lines = parse_input(input_path.read_bytes(), URLS)
    defaults = read_sampling_defaults(Path(llm.engine.model_dir))
    prepared = [prepare(llm, line, defaults) for line in lines]
    on_progress(0, len(prepared))
    done = 0
    with output_path.open("wb") as out_file:
        for chunk in _chunks(prepared):
            outputs = llm.generate([p.prompt_ids for p in chunk], [p.params for p in chunk], use_tqdm=False)
            for item, out in zip(chunk, outputs):
                request_id = uuid.uuid4().hex
                out_file.write(response_line(item.line.custom_id, 200, request_id, response_body(item, out)) + b"\n")
            done += len(chunk)
            on_progress(done, len(prepared))
    return len(prepared)
