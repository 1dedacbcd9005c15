"""One settings layer for `lmserve serve`, `lmserve gateway` and `lmserve up`.

Each command describes its settings once (a `SettingsSpec`: the keys, their types, nested sections,
other names) and reads them through `layered()`, which applies the same precedence for all three:
CLI flags > `LMSERVE_*` environment > YAML file > defaults. The names are the same everywhere:
`LMSERVE_PORT`, `port:` and `--port` mean the port of whichever command reads them; a nested key is
`LMSERVE_<SECTION>__<KEY>` (`LMSERVE_TIMEOUTS__CONNECT=1`). An `LMSERVE_*` variable a command does not
know is ignored, because one environment (a container, `lmserve up`'s children) serves several
commands. Old names still work and log one warning line each (`DEPRECATED`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model

ENV_PREFIX = "LMSERVE_"
LOG_LEVELS = ("debug", "info", "warning", "error")

# lmserve's own former names of settings: still read from flags, environment and files, with a warning.
DEPRECATED = {
    "ssl_certfile": "tls_certfile",
    "ssl_keyfile": "tls_keyfile",
    "drain_timeout": "drain_seconds",
    "redis": "redis_url",
}

log = logging.getLogger("lmserve.settings")


def lmserve_home() -> Path:
    """Where `lmserve up` keeps keys, logs and generated configs: $LMSERVE_HOME, else ~/.lmserve."""
    return Path(os.environ.get("LMSERVE_HOME") or Path.home() / ".lmserve").expanduser()


def check_log_level(value: str) -> None:
    """Raises ValueError unless `value` is one of LOG_LEVELS (the same check for every command)."""
    if value not in LOG_LEVELS:
        raise ValueError(f"log_level must be debug, info, warning or error; got {value!r}")


@dataclass(frozen=True)
class SettingsSpec:
    """The settings one command reads. Invariant: `types` and `sections` name disjoint keys."""

    command: str
    """The command, for messages (`serve`, `gateway`, `up`)."""
    types: Mapping[str, Any]
    """Top-level key -> type annotation (used to parse environment text)."""
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Key of a nested mapping -> its keys and types (`timeouts` -> {`connect`: float})."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Other serving stacks' names for the same settings, accepted silently."""
    old_env_prefix: str | None = None
    """A former per-command prefix (`LMSERVE_GATEWAY_`), read with a warning; `LMSERVE_*` wins over it."""
    env_skip: frozenset[str] = frozenset()
    """Keys never read from the environment, where the same variable means another command's setting."""
    file_root: str | None = None
    """A YAML file may hold the settings under this key instead of at its top level."""

    def canonical(self, key: str, where: str) -> str:
        """The setting a name given in `where` (a flag, variable or file) refers to; warns on old names."""
        key = key.strip().lower().replace("-", "_")
        key = self.aliases.get(key, key)
        if key in DEPRECATED and DEPRECATED[key] in self.types:
            log.warning("lmserve %s: %s is deprecated, use %s", self.command, where, _spell(where, DEPRECATED[key]))
            return DEPRECATED[key]
        return key


def _spell(where: str, new: str) -> str:
    """The new name written as the old one was (`--drain-timeout` -> `--drain-seconds`)."""
    if where.startswith("--"):
        return "--" + new.replace("_", "-")
    if where.startswith(ENV_PREFIX):
        return ENV_PREFIX + new.upper()
    return new


def spec_from_dataclass(command: str, cls: type, **options: Any) -> SettingsSpec:
    """A spec from a config dataclass; a field holding a dataclass (or an optional one) is a section."""
    types_: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for name, annotation in typing.get_type_hints(cls).items():
        inner = [a for a in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(a)]
        if inner:
            sections[name] = typing.get_type_hints(inner[0])
        else:
            types_[name] = annotation
    return SettingsSpec(command, types_, sections, **options)


def layered(
    spec: SettingsSpec,
    flags: Mapping[str, Any],
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The settings as plain data: defaults are left to the caller's model, then the file, the
    environment and the flags override in that order (a section merges key by key). Raises
    ValueError (one line) for an unreadable file, an unknown file key or unparsable environment text."""
    values = read_file(spec, Path(config_file)) if config_file is not None else {}
    values = merge(values, read_env(spec, os.environ if environ is None else environ))
    given = {}
    for flag, value in flags.items():
        if value is None:
            continue
        key = spec.canonical(flag, "--" + flag.replace("_", "-"))
        is_text = isinstance(value, str) and _is_collection(spec.types.get(key))
        given[key] = parse_text(key, value, spec.types[key]) if is_text else value
    return merge(values, given)


def read_file(spec: SettingsSpec, path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config file {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    if spec.file_root is not None and isinstance(data.get(spec.file_root), dict):
        data = data[spec.file_root]
    values = {}
    for key, value in data.items():
        name = spec.canonical(str(key), str(key))
        if name not in spec.types and name not in spec.sections:
            raise ValueError(f"config file {path}: unknown setting {key!r}")
        values[name] = value
    return values


def read_env(spec: SettingsSpec, environ: Mapping[str, str]) -> dict[str, Any]:
    """`LMSERVE_<KEY>` and `LMSERVE_<SECTION>__<KEY>`, typed; the old prefix first so the new wins."""
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for variable, text in environ.items():
        if spec.old_env_prefix and variable.startswith(spec.old_env_prefix):
            found = _env_setting(spec, variable, variable[len(spec.old_env_prefix):], text)
            if found:
                log.warning("lmserve %s: %s is deprecated, use %s", spec.command, variable,
                            ENV_PREFIX + variable[len(spec.old_env_prefix):])
                old = merge(old, found)
        elif variable.startswith(ENV_PREFIX):
            new = merge(new, _env_setting(spec, variable, variable[len(ENV_PREFIX):], text))
    return merge(old, new)


def _env_setting(spec: SettingsSpec, variable: str, rest: str, text: str) -> dict[str, Any]:
    """{key: value} or {section: {key: value}} for one variable; {} when the command has no such setting."""
    path = rest.lower().split("__")
    if len(path) == 1:
        key = spec.canonical(path[0], variable)
        if key in spec.types and key not in spec.env_skip:
            return {key: parse_text(key, text, spec.types[key])}
    elif len(path) == 2 and path[1] in spec.sections.get(path[0], {}):
        section, key = path
        return {section: {key: parse_text(f"{section}.{key}", text, spec.sections[section][key])}}
    return {}


def parse_text(name: str, text: str, annotation: Any) -> Any:
    """A setting's value from environment text: empty is None, mappings and lists are YAML or JSON,
    booleans true/false (1/0, yes/no, on/off), numbers as written, anything else the text itself."""
    if text == "":
        return None
    if _is_collection(annotation):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"invalid setting {name}: expected YAML or JSON like '{{a: 1}}', got {text!r}") from None
    kind = _scalar_type(annotation)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return lowered in ("true", "1", "yes", "on")
        raise ValueError(f"invalid setting {name}: expected true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"invalid setting {name}: expected {'an integer' if kind is int else 'a number'}, "
                             f"got {text!r}") from None
    return text


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`; where both hold a mapping, key by key."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


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
            fields[f.name] = (hints[f.name], Field(default=_default(f), description=docs.get(f.name, "")))
    base = type(f"{name}Base", (BaseModel,), {"model_config": ConfigDict(extra="forbid")})
    model: type[BaseModel] = create_model(name, __base__=base, **fields)
    model.ALIASES = dict(aliases)  # type: ignore[attr-defined]
    model.SOURCES = list(sources)  # type: ignore[attr-defined]
    return model


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...


def spec_from_model(command: str, model: type[BaseModel]) -> SettingsSpec:
    """A flat spec from a `settings_model`."""
    types_ = {name: info.annotation for name, info in model.model_fields.items()}
    return SettingsSpec(command, types_, aliases=getattr(model, "ALIASES", {}))


def load_settings(
    model: type[BaseModel],
    cli: Mapping[str, Any],
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    command: str = "serve",
) -> BaseModel:
    """Validates the layered settings. Raises `ValueError` with one line naming the bad setting."""
    from pydantic import ValidationError

    values = layered(spec_from_model(command, model), cli, config_file, environ)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise ValueError(f"invalid setting {where}: {first.get('msg')}") from None


class SettingsParser(argparse.ArgumentParser):
    """argparse with the project's CLI error shape: one line on stderr, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def config_file_parser(prog: str, description: str, config_help: str, flags: list[Flag]) -> SettingsParser:
    """The parser of a command configured by a YAML file (`--config/-c`) and one flag per setting."""
    parser = SettingsParser(prog=prog, description=description)
    parser.add_argument("--config", "-c", default=None, help=config_help)
    add_flags(parser, flags)
    return parser


@dataclass(frozen=True)
class Flag:
    """One `--kebab-case` flag for a setting."""

    name: str
    annotation: Any
    help: str
    default: Any = None


def model_flags(model: type[BaseModel], skip: Iterable[str] = ()) -> list[Flag]:
    return [Flag(name, info.annotation, info.description or "", info.default)
            for name, info in model.model_fields.items() if name not in skip]


def dataclass_flags(cls: type, skip: Iterable[str] = ()) -> list[Flag]:
    """A flag per field of `cls` that is not a section (mappings and lists are written as YAML)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    return [Flag(f.name, hints[f.name], docs.get(f.name, ""), _default(f)) for f in dataclasses.fields(cls)
            if f.name not in skip and not any(dataclasses.is_dataclass(a) for a in
                                                 (hints[f.name], *typing.get_args(hints[f.name])))]


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One `--kebab-case` flag per field of a settings model (see `add_flags`)."""
    add_flags(parser, model_flags(model, skip))


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    """One `--kebab-case` flag per setting, plus hidden ones for `DEPRECATED` names (their `dest` is the
    old name, so `layered` warns); only flags given on the command line land in the result."""
    old_names = {new: old for old, new in DEPRECATED.items()}
    for flag in flags:
        kind = _scalar_type(flag.annotation)
        help_text = flag.help.replace("%", "%%")
        if flag.default is not None and flag.default is not ... and not _is_empty(flag.default):
            help_text += f" (default: {flag.default})"
        if _is_collection(flag.annotation):
            help_text += " (YAML or JSON, e.g. '{team-a: 2}')"
        names = [(flag.name, help_text)]
        if flag.name in old_names:
            names.append((old_names[flag.name], argparse.SUPPRESS))
        for name, text in names:
            option = "--" + name.replace("_", "-")
            if kind is bool:
                parser.add_argument(option, dest=name, action=argparse.BooleanOptionalAction,
                                    default=argparse.SUPPRESS, help=text)
            else:
                parser.add_argument(option, dest=name, type=kind, default=argparse.SUPPRESS, help=text,
                                    metavar=flag.name.upper())


def _is_empty(value: Any) -> bool:
    return isinstance(value, (dict, list)) and not value


def _is_collection(annotation: Any) -> bool:
    origins = {typing.get_origin(annotation), *(typing.get_origin(a) for a in typing.get_args(annotation))}
    return bool(origins & {dict, list})


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
    """The variable of a setting: `port` -> LMSERVE_PORT, `timeouts.connect` -> LMSERVE_TIMEOUTS__CONNECT."""
    return ENV_PREFIX + field.replace(".", "__").upper()
