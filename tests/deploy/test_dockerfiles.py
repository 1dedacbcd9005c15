"""Static checks of deploy/docker and deploy/compose that need no Docker daemon: hadolint on every
Dockerfile (the CUDA variant is the same file with other build args, so it is linted here although
it is only built where a GPU machine is), and Compose's own validation of the compose file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.services import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: pip install -e '.[dev]'")
    return path


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER_DIR.iterdir() if "Dockerfile" in p.name))
def test_hadolint_finds_nothing(dockerfile: str) -> None:
    done = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKER_DIR / dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_is_valid_and_scrapes_the_agreed_jobs() -> None:
    done = subprocess.run([_tool("docker-compose"), "-f", str(COMPOSE_DIR / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    assert {"lmserve-server", "lmserve-gateway"} <= jobs  # the alert rules and dashboards select these
    assert prometheus["rule_files"] == ["/etc/prometheus/rules/*.yml"]
