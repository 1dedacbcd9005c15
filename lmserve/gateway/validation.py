"""Input validation: every malformed request gets a 400/413 with an OpenAI error body.

Only what routing, accounting and backend safety need is checked; the backend validates the rest.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _check_max_tokens(name: str, value: Any, limits: LimitsConfig) -> None:
    if not _is_int(value) or value < 1:
        raise bad_request(f"`{name}` must be a positive integer.", param=name)
    if value > limits.max_tokens_limit:
        raise bad_request(f"`{name}` is {value}; at most {limits.max_tokens_limit} is allowed.", param=name)


def _in_range(low: float, high: float) -> Callable[[str, Any, LimitsConfig], None]:
    def check(name: str, value: Any, limits: LimitsConfig) -> None:
        if not _is_number(value) or not low <= value <= high:
            raise bad_request(f"`{name}` must be a number between {low} and {high}.", param=name)
    return check


def _check_n(name: str, value: Any, limits: LimitsConfig) -> None:
    if not _is_int(value) or not 1 <= value <= 128:
        raise bad_request("`n` must be an integer between 1 and 128.", param=name)


def _check_seed(name: str, value: Any, limits: LimitsConfig) -> None:
    if not _is_int(value):
        raise bad_request("`seed` must be an integer.", param=name)


def _check_stream(name: str, value: Any, limits: LimitsConfig) -> None:
    if not isinstance(value, bool):
        raise bad_request("`stream` must be a boolean.", param=name)


def _check_stream_options(name: str, value: Any, limits: LimitsConfig) -> None:
    if not isinstance(value, dict):
        raise bad_request("`stream_options` must be an object.", param=name)


def _check_stop(name: str, value: Any, limits: LimitsConfig) -> None:
    if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        raise bad_request("`stop` must be a string or a list of strings.", param=name)


_CHECKS: dict[str, Callable[[str, Any, LimitsConfig], None]] = {
    "max_tokens": _check_max_tokens, "max_completion_tokens": _check_max_tokens,
    "temperature": _in_range(0, 2), "top_p": _in_range(0, 1),
    "presence_penalty": _in_range(-2, 2), "frequency_penalty": _in_range(-2, 2),
    "n": _check_n, "seed": _check_seed, "stream": _check_stream, "stream_options": _check_stream_options,
    "stop": _check_stop,
}
"""Checks of the body fields the gateway relies on; a null value is left to the backend's default."""


def _check_sampling(body: dict[str, Any], limits: LimitsConfig) -> None:
    # Walks the fields present (usually a handful) rather than looking up every checked name.
    for name, value in body.items():
        check = _CHECKS.get(name)
        if check is not None and value is not None:
            check(name, value, limits)


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
