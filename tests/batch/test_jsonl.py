"""The batch file formats (lmserve/batch/jsonl.py) and the upload form parser, without processes."""

from __future__ import annotations

import orjson
import pytest

from lmserve.batch.jsonl import BatchInputError, error_line, parse_input, response_line
from lmserve.gateway.batches.multipart import parse_form
from lmserve.gateway.errors import GatewayError

URLS = ("/v1/chat/completions", "/v1/completions")


def _line(custom_id: str, url: str = "/v1/completions") -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                         "body": {"model": "m", "prompt": "x"}}) + b"\n"


def test_lines_are_numbered_skipping_blank_ones() -> None:
    lines = parse_input(b"\n" + _line("a") + b"   \n" + _line("b", "/v1/chat/completions"), URLS)
    assert [(x.index, x.custom_id, x.url) for x in lines] == [(0, "a", "/v1/completions"),
                                                              (1, "b", "/v1/chat/completions")]


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff\xfe", "not UTF-8"),
    (b"", "no requests"),
    (_line("a") + b"[1, 2]\n", "line 2: each line must be a JSON object"),
    (_line("a") + _line("b") + _line("a"), "line 3: duplicate custom_id 'a' (first on line 1)"),
    (orjson.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m"},
                   "extra": 1}), "line 1: unknown field(s) ['extra']"),
])
def test_bad_files_name_their_first_bad_line(data: bytes, message: str) -> None:
    with pytest.raises(BatchInputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_input(data, URLS)


def test_request_count_is_bounded() -> None:
    with pytest.raises(BatchInputError, match="line 3: the file has more than 2 requests"):
        parse_input(_line("a") + _line("b") + _line("c"), URLS, max_lines=2)


def test_output_and_error_lines_have_openais_shape() -> None:
    ok = orjson.loads(response_line("a", 200, "req-1", {"x": 1}))
    assert ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"] == {"status_code": 200, "request_id": "req-1", "body": {"x": 1}}
    failed = orjson.loads(error_line("b", "batch_expired", "late"))
    assert failed["response"] is None and failed["error"] == {"code": "batch_expired", "message": "late"}


def test_form_fields_and_malformed_bodies() -> None:
    body = (b'--b1\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b1\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            b'Content-Type: application/jsonl\r\n\r\n{"a": 1}\r\n{"b": 2}\n\r\n--b1--\r\n')
    form = parse_form(body, b'multipart/form-data; boundary="b1"')
    assert form["purpose"].content == b"batch" and form["file"].filename == "in.jsonl"
    assert form["file"].content == b'{"a": 1}\r\n{"b": 2}\n'
    for bad_body, content_type in ((body, b"application/json"), (body, b"multipart/form-data"),
                                   (body[:-8], b"multipart/form-data; boundary=b1"),
                                   (b"junk", b"multipart/form-data; boundary=b1")):
        with pytest.raises(GatewayError) as caught:
            parse_form(bad_body, content_type)
        assert caught.value.status == 400
