"""Renders deploy/helm/lmserve with Helm's own Go SDK (PyPI helm-python-sdk; no helm binary)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "lmserve"
VALUES_FILES = ("values-dev.yaml", "values-staging.yaml", "values-prod.yaml")
KUBE_VERSION = "v1.30.0"
NAMESPACE = "llm"


def values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text())


def render(overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest the chart renders for these values (merged over values.yaml by Helm)."""
    rendered = helm.Chart.load(CHART).render(overrides, name="lmserve", namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


@cache
def render_file(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(values(name)))


def lint(overrides: dict[str, Any]) -> dict[str, Any]:
    return helm.lint(CHART, overrides, strict=True, kube_version=KUBE_VERSION)


def by_kind(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def component(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [doc for doc in by_kind(docs, kind)
            if doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name]
