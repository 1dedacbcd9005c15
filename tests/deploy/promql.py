"""Metric names in PromQL and in Prometheus exposition text, for checking rules and dashboards
against what the code exports. A small lexer, not a parser: Prometheus itself (promtool, the live
server in test_observability.py) decides whether an expression parses."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
# `by (a, b)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`: label lists.
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan", "atan2"}
# Series Prometheus makes itself for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",), "unknown": ("",)}


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (functions, keywords and labels left out)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end():].lstrip()
        word = match.group()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", word) or text[max(0, match.start() - 1)].isdigit():
            continue  # a duration (5m) or the exponent of a number (1e3)
        names.add(word)
    return names


def exported_names(exposition: str) -> tuple[set[str], set[str]]:
    """(every sample name a /metrics page may carry, those that have at least one sample now)."""
    allowed: set[str] = set()
    produced: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        allowed.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        produced.update(sample.name for sample in family.samples)
    return allowed, produced


def rule_files(rules_dir: Path) -> list[Path]:
    return sorted(rules_dir.glob("*.yml"))


def rules(rules_dir: Path) -> Iterable[dict]:
    for path in rule_files(rules_dir):
        for group in yaml.safe_load(path.read_text())["groups"]:
            yield from group["rules"]


def dashboard_queries(dashboards_dir: Path) -> Iterable[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every panel, rows included."""
    import json

    for path in sorted(dashboards_dir.glob("*.json")):
        stack = list(json.loads(path.read_text())["panels"])
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield path.name, panel["title"], target["expr"]
