"""OpenAI's batch JSONL formats: the input lines a client uploads and the output / error lines it downloads.

Input, one JSON object a line: `{"custom_id": str, "method": "POST", "url": "/v1/chat/completions",
"body": {"model": ..., ...}}`. Output and error lines: `{"id": "batch_req_...", "custom_id",
"response": {"status_code", "request_id", "body"} | null, "error": {"code", "message"} | null}`.
A request that got an HTTP answer has `response` (errors included: a 4xx answer goes to the error
file with its body); one that never got one (expired, cancelled) has `error` instead.

Pure functions, no I/O: the gateway and the offline runner parse and write the same way.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request of an input file. Invariant: `index` is its 0-based position among the non-blank lines."""

    index: int
    custom_id: str
    url: str
    body: dict[str, Any]


class BatchInputError(ValueError):
    """A bad input file; `line` is the 1-based line number in the file (None: the file as a whole)."""

    def __init__(self, message: str, line: int | None = None, param: str | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line
        self.param = param


def _check_line(value: Any, number: int, urls: Collection[str]) -> tuple[str, str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise BatchInputError("each line must be a JSON object", number)
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchInputError("`custom_id` must be a non-empty string", number, "custom_id")
    if value.get("method") != "POST":
        raise BatchInputError(f"`method` must be \"POST\", got {value.get('method')!r}", number, "method")
    url = value.get("url")
    if not isinstance(url, str) or url not in urls:
        raise BatchInputError(f"`url` must be one of {sorted(urls)}, got {url!r}", number, "url")
    body = value.get("body")
    if not isinstance(body, dict):
        raise BatchInputError("`body` must be a JSON object", number, "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BatchInputError("`body.model` must be a non-empty string", number, "body.model")
    if body.get("stream") is True:
        raise BatchInputError("`body.stream` is not supported in a batch", number, "body.stream")
    unknown = set(value) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise BatchInputError(f"unknown field(s) {sorted(unknown)}", number)
    return custom_id, url, body


def parse_input(data: bytes, urls: Collection[str], max_lines: int | None = None) -> list[BatchLine]:
    """Every request of a batch input file, validated; raises BatchInputError naming the first bad line.

    Checked: UTF-8 JSON objects, `custom_id` unique, `method` POST, `url` one of `urls`, `body` an object
    with a `model`. Blank lines are skipped (a trailing newline is common).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BatchInputError(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BatchInputError(f"invalid JSON: {exc}", number) from None
        custom_id, url, body = _check_line(value, number, urls)
        if custom_id in seen:
            raise BatchInputError(f"duplicate custom_id {custom_id!r} (first on line {seen[custom_id]})",
                                  number, "custom_id")
        seen[custom_id] = number
        lines.append(BatchLine(len(lines), custom_id, url, body))
        if max_lines is not None and len(lines) > max_lines:
            raise BatchInputError(f"the file has more than {max_lines} requests", number)
    if not lines:
        raise BatchInputError("the file has no requests")
    return lines


def request_line_id() -> str:
    return "batch_req_" + os.urandom(12).hex()


def response_line(custom_id: str, status_code: int, request_id: str, body: Any) -> bytes:
    """One output-file line (or error-file line, for a non-2xx `status_code`), without a newline."""
    return orjson.dumps({"id": request_line_id(), "custom_id": custom_id,
                         "response": {"status_code": status_code, "request_id": request_id, "body": body},
                         "error": None})


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """One error-file line for a request that got no HTTP answer (expired, cancelled)."""
    return orjson.dumps({"id": request_line_id(), "custom_id": custom_id, "response": None,
                         "error": {"code": code, "message": message}})


def is_success(status_code: int) -> bool:
    return 200 <= status_code < 300
