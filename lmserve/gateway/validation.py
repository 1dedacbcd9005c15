"""Input validation: every malformed request gets a 400/413 with an OpenAI error body.

Only what routing, accounting and backend safety need is checked; the backend validates the rest.
"""

from __future__ import annotations

from typing import Any

import orjson

from lmserve.gateway.config import LimitsConfig
from lmserve.gateway.errors import GatewayError, bad_request

CHAT_PATH = b"/v1/chat/completions"
COMPLETIONS_PATH = b"/v1/completions"


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value) or not low <= value <= high:
        raise bad_request(f"`{name}` must be a number between {low} and {high}.", param=name)


def _check_sampling(body: dict[str, Any], limits: LimitsConfig) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise bad_request(f"`{name}` must be a positive integer.", param=name)
        if value > limits.max_tokens_limit:
            raise bad_request(f"`{name}` is {value}; at most {limits.max_tokens_limit} is allowed.", param=name)
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    _check_number(body, "presence_penalty", -2, 2)
    _check_number(body, "frequency_penalty", -2, 2)
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= 128):
        raise bad_request("`n` must be an integer between 1 and 128.", param="n")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad_request("`seed` must be an integer.", param="seed")
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise bad_request("`stream` must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("`stream_options` must be an object.", param="stream_options")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("`stop` must be a string or a list of strings.", param="stop")


def _message_chars(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty array.", param="messages")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"`messages[{i}]` must be an object with a string `role`.", param=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise bad_request(f"`messages[{i}].content` parts must be objects.", param=f"messages[{i}]")
                text = part.get("text")
                total += len(text) if isinstance(text, str) else 0
        elif content is not None:
            raise bad_request(f"`messages[{i}].content` must be a string or an array.", param=f"messages[{i}]")
    return total


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return sum(len(p) for p in prompt)
        if all(_is_int(t) for t in prompt) or all(isinstance(p, list) for p in prompt):
            return len(prompt)
    raise bad_request("`prompt` must be a string, an array of strings, or token ids.", param="prompt")


def validate(path: bytes, body: dict[str, Any], limits: LimitsConfig) -> str:
    """Checks the body of a request to `path`; returns the model name."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` is required and must be a non-empty string.", param="model")
    if path == CHAT_PATH:
        num_chars = _message_chars(body.get("messages"))
    elif path == COMPLETIONS_PATH:
        if "prompt" not in body:
            raise bad_request("`prompt` is required.", param="prompt")
        num_chars = _prompt_chars(body["prompt"])
    else:
        return model
    if num_chars > limits.max_prompt_chars:
        raise bad_request(f"The prompt has {num_chars} characters; at most {limits.max_prompt_chars} are allowed.",
                          code="context_length_exceeded")
    _check_sampling(body, limits)
    return model


def prompt_text(body: dict[str, Any], num_chars: int) -> str:
    """The first `num_chars` characters of the prompt (prefix affinity; usage estimates)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:num_chars]
    if isinstance(prompt, list):
        return "".join(p if isinstance(p, str) else str(p) for p in prompt)[:num_chars]
    parts: list[str] = []
    size = 0
    for message in body.get("messages") or []:
        content = message.get("content")
        text = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content or [] if isinstance(p, dict) and isinstance(p.get("text"), str))
        parts.append(text)
        size += len(text)
        if size >= num_chars:
            break
    return "".join(parts)[:num_chars]


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error",
                        "request_too_large")
