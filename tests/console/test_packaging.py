"""The console's files ship in the package: every file in lmserve/gateway/ui matches the package data
globs in pyproject.toml (a wheel built without them would serve a gateway with no console)."""

from __future__ import annotations

import fnmatch

import tomllib

from lmserve.gateway.console import Console
from tests.services import REPO_ROOT


def test_every_console_file_is_package_data_and_served() -> None:
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "lmserve.gateway"]
    ui = REPO_ROOT / "lmserve" / "gateway" / "ui"
    names = sorted(p.name for p in ui.iterdir() if p.is_file())
    assert "index.html" in names and "app.js" in names
    assert [n for n in names if not any(fnmatch.fnmatch(f"ui/{n}", p) for p in patterns)] == []
    assert sorted(Console().files) == names  # nothing in the directory is left unserved
