"""Flat settings built from config dataclasses: one place that defines each setting's name, type,
default and help, used for CLI flags, `LMSERVE_*` environment variables, YAML files and the docs.

Precedence: CLI flags > environment > YAML file > defaults.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model

ENV_PREFIX = "LMSERVE_"


def lmserve_home() -> Path:
    """Where `lmserve up` keeps keys, logs and generated configs: $LMSERVE_HOME, else ~/.lmserve."""
    return Path(os.environ.get("LMSERVE_HOME") or Path.home() / ".lmserve").expanduser()


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (`x: int = 1` then `\"\"\"doc\"\"\"`)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def settings_model(name: str, sources: list[type], aliases: Mapping[str, str]) -> type[BaseModel]:
    """A pydantic model with every field of the `sources` dataclasses, flat, unknown keys refused."""
    fields: dict[str, Any] = {}
    for source in sources:
        hints = typing.get_type_hints(source)
        docs = field_docs(source)
        for f in dataclasses.fields(source):
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = ...
            fields[f.name] = (hints[f.name], Field(default=default, description=docs.get(f.name, "")))
    base = type(f"{name}Base", (BaseModel,), {"model_config": ConfigDict(extra="forbid")})
    model = create_model(name, __base__=base, **fields)
    model.ALIASES = dict(aliases)  # type: ignore[attr-defined]
    model.SOURCES = list(sources)  # type: ignore[attr-defined]
    return model


def canonical_key(model: type[BaseModel], key: str) -> str:
    key = key.strip().lower().replace("-", "_")
    return getattr(model, "ALIASES", {}).get(key, key)


def load_settings(
    model: type[BaseModel],
    cli: Mapping[str, Any],
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> BaseModel:
    """Validates the layered settings. Raises `ValueError` with one line naming the bad setting."""
    from pydantic import ValidationError

    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_from_yaml(model, Path(config_file)))
    env = os.environ if environ is None else environ
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = canonical_key(model, key[len(ENV_PREFIX) :])
            if name in model.model_fields:
                values[name] = None if value == "" else value
    values.update({canonical_key(model, k): v for k, v in cli.items()})
    for name, value in values.items():
        if isinstance(value, str) and name in model.model_fields and _is_collection(model.model_fields[name].annotation):
            values[name] = _parse_text(name, value)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise ValueError(f"invalid setting {where}: {first.get('msg')}") from None


def _is_collection(annotation: Any) -> bool:
    origins = {typing.get_origin(annotation), *(typing.get_origin(a) for a in typing.get_args(annotation))}
    return bool(origins & {dict, list})


def _parse_text(name: str, text: str) -> Any:
    """A mapping or list given on the command line or in the environment, written as YAML/JSON."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"invalid setting {name}: expected YAML or JSON like '{{a: 1}}', got {text!r}") from None


def _from_yaml(model: type[BaseModel], path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config file {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    values = {}
    for key, value in data.items():
        name = canonical_key(model, str(key))
        if name not in model.model_fields:
            raise ValueError(f"config file {path}: unknown setting {key!r}")
        values[name] = value
    return values


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One `--kebab-case` flag per field; only flags given on the command line land in the result."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        kind = _scalar_type(info.annotation)
        help_text = (info.description or "").replace("%", "%%")
        if info.default is not None and info.default is not ...:
            help_text += f" (default: {info.default})"
        if _is_collection(info.annotation):
            help_text += " (YAML or JSON, e.g. '{team-a: 2}')"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text, metavar=name.upper())


def _scalar_type(annotation: Any) -> type:
    """int / float / bool / str from an annotation such as `int | None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _scalar_type(non_none[0]) if len(non_none) == 1 else str
    if annotation in (int, float, bool, str):
        return annotation
    return str


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()
