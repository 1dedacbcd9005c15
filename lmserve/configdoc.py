"""Writes docs/configuration.md from the settings dataclasses, so the reference cannot drift.

    python -m lmserve.configdoc > docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from lmserve.settings import DEPRECATED, env_name, field_docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "-"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _type(annotation: Any) -> str:
    """`int | None` -> `int, optional` (a bare `|` would split a Markdown table cell)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return ", ".join(_type(a) for a in inner) + ", optional"
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "or")


def _nested(annotation: Any) -> tuple[type, bool] | None:
    """The dataclass a field holds (directly, optionally, or as list elements) and whether in a list."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate):
            return candidate, False  # type: ignore[return-value]
        for inner in typing.get_args(candidate):
            if dataclasses.is_dataclass(inner):
                return inner, typing.get_origin(candidate) is list  # type: ignore[return-value]
    return None


def serve_section() -> list[str]:
    from lmserve.server.settings import ALIASES, SOURCES

    lines = [
        "## `lmserve serve`",
        "",
        "Every setting is a flag (`--max-num-seqs 64`), an environment variable (`LMSERVE_MAX_NUM_SEQS=64`) and "
        "a key of the `--config` YAML file (`max_num_seqs: 64`). Precedence: flags > environment > file > defaults.",
        "",
    ]
    for source in SOURCES:
        docs = field_docs(source)
        hints = typing.get_type_hints(source)
        summary = (source.__doc__ or "").strip().splitlines()[0]
        lines += [f"### `{source.__name__}`", "", summary, "",
                  "| setting | flag | environment | type | default | meaning |", "|---|---|---|---|---|---|"]
        for f in dataclasses.fields(source):
            flag = "MODEL (argument)" if f.name == "model" else "`--" + f.name.replace("_", "-") + "`"
            lines.append(f"| `{f.name}` | {flag} | `{env_name(f.name)}` | {_type(hints[f.name])} | "
                         f"{_default(f)} | {docs.get(f.name, '')} |")
        lines.append("")
    lines += ["Other names accepted for the same settings (environment and file):", ""]
    lines += [f"- `{alias}` -> `{name}`" for alias, name in sorted(ALIASES.items())]
    return lines + [""]


def _gateway_rows(cls: type, prefix: str, in_list: bool) -> tuple[list[str], list[tuple[str, type, bool]]]:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        nested = _nested(hints[f.name])
        if nested is not None:
            sections.append((prefix + f.name, nested[0], in_list or nested[1]))
            continue
        key = prefix + f.name
        env = "-" if in_list else f"`{env_name(key)}`"
        flag = "-" if prefix or f.name == "models" else "`--" + f.name.replace("_", "-") + "`"
        rows.append(f"| `{key}` | {flag} | {env} | {_type(hints[f.name])} | {_default(f)} | {docs.get(f.name, '')} |")
    return rows, sections


def gateway_section() -> list[str]:
    from lmserve.gateway.config import GatewayConfig

    lines = [
        "## `lmserve gateway`",
        "",
        "Every top-level setting is a flag (`--drain-seconds 10`), an environment variable "
        "(`LMSERVE_DRAIN_SECONDS=10`) and a key of the `--config` YAML file (`drain_seconds: 10`, also accepted "
        "under a top-level `gateway:` key). A key inside a section is `LMSERVE_<SECTION>__<KEY>` "
        "(`LMSERVE_TIMEOUTS__CONNECT=1`); mappings and lists are written as YAML or JSON. "
        "Precedence: flags > environment > file > defaults.",
        "",
    ]
    pending: list[tuple[str, type, bool]] = [("", GatewayConfig, False)]
    while pending:
        prefix, cls, in_list = pending.pop(0)
        title = "Top level" if not prefix else f"`{prefix}`" + (" (list entries)" if in_list else "")
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows, sections = _gateway_rows(cls, prefix + "." if prefix else "", in_list)
        lines += [f"### {title}", "", doc, "", "| key | flag | environment | type | default | meaning |",
                  "|---|---|---|---|---|---|", *rows, ""]
        pending += sections
    return lines


def stack_section() -> list[str]:
    from lmserve.stack.config import ModelDeployment, StackConfig, settings_spec

    no_env = settings_spec().env_skip
    lines = ["## `lmserve up`", "",
             "The stack file (`lmserve up -c stack.yaml`); without one, the built-in stack serves two replicas of "
             "the demo model. Top-level settings are also flags and `LMSERVE_*` variables (not `api_key`, "
             "`models` and `gateway`, whose variables belong to `serve` and `gateway`). `lmserve up` hands "
             "`drain_seconds` and `log_level` to the gateway and every server as flags.", ""]
    for cls, title in ((StackConfig, "Top level"), (ModelDeployment, "`models` (list entries)")):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        top = cls is StackConfig
        lines += [f"### {title}", "", "| key | flag | environment | type | default | meaning |",
                  "|---|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            flag = "`--" + f.name.replace("_", "-") + "`" if top and f.name not in ("models", "gateway") else "-"
            env = f"`{env_name(f.name)}`" if top and f.name not in no_env else "-"
            lines.append(f"| `{f.name}` | {flag} | {env} | {_type(hints[f.name])} | {_default(f)} | "
                         f"{docs.get(f.name, '')} |")
        lines.append("")
    return lines


def shared_section() -> list[str]:
    return [
        "## One layer for every command",
        "",
        "`lmserve serve`, `lmserve gateway` and `lmserve up` read their settings the same way: CLI flags > "
        "`LMSERVE_*` environment variables > the `--config` YAML file > defaults. A setting the commands share "
        "has one name everywhere (`port`, `host`, `log_level`, `drain_seconds`, `tls_certfile`, `tls_keyfile`): "
        "the same flag, variable and YAML key. A command ignores an `LMSERVE_*` variable it has no setting for, "
        "so one environment (a container, a Helm `env`, `lmserve up`'s children) can serve them all.",
        "",
        "Former names still work and log one warning line each (`lmserve serve: --drain-timeout is deprecated, "
        "use --drain-seconds`):",
        "",
        *[f"- `{old}` -> `{new}` (flag, variable and YAML key)" for old, new in DEPRECATED.items()],
        "- `LMSERVE_GATEWAY_<KEY>` -> `LMSERVE_<KEY>` (the gateway's former prefix; the new name wins when both "
        "are set)",
        "",
    ]


def render() -> str:
    head = ["# Configuration reference", "",
            "Generated by `python -m lmserve.configdoc` from the settings dataclasses; a test fails when this "
            "file and the code disagree.", ""]
    sections = shared_section() + serve_section() + gateway_section() + stack_section()
    return "\n".join(head + sections).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
