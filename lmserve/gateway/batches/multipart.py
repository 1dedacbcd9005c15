"""A `multipart/form-data` body, already read whole, as its fields (what `files.create` sends)."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.gateway.errors import bad_request


@dataclass(frozen=True, slots=True)
class FormField:
    name: str
    filename: str | None
    content: bytes


def _params(header: bytes) -> dict[str, str]:
    """`form-data; name="file"; filename="in.jsonl"` -> {"name": "file", "filename": "in.jsonl"}."""
    values: dict[str, str] = {}
    for part in header.decode("utf-8", "replace").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        values[key.lower()] = value
    return values


def boundary_of(content_type: bytes | None) -> bytes:
    if not content_type or not content_type.lower().startswith(b"multipart/form-data"):
        raise bad_request("Upload files as multipart/form-data (fields `file` and `purpose`).")
    boundary = _params(content_type).get("boundary")
    if not boundary:
        raise bad_request("The multipart/form-data Content-Type has no boundary.")
    return boundary.encode("latin-1")


def parse_form(body: bytes, content_type: bytes | None) -> dict[str, FormField]:
    """The fields by name (the last wins); a body that is not well-formed multipart is a 400."""
    delimiter = b"--" + boundary_of(content_type)
    parts = body.split(b"\r\n" + delimiter)
    if not parts[0].startswith(delimiter):
        raise bad_request("Malformed multipart body: it does not start with its boundary.")
    parts[0] = parts[0][len(delimiter):]
    fields: dict[str, FormField] = {}
    for part in parts:
        if part.startswith(b"--"):
            return fields
        head, separator, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise bad_request("Malformed multipart body: a part has no header end.")
        disposition = next((line for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-disposition:")), None)
        params = _params(disposition.split(b":", 1)[1]) if disposition else {}
        if "name" not in params:
            raise bad_request("Malformed multipart body: a part has no form field name.")
        fields[params["name"]] = FormField(params["name"], params.get("filename"), content)
    raise bad_request("Malformed multipart body: it has no closing boundary.")
