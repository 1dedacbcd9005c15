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


def test_compose_gateway_reads_its_environment_under_the_current_names(caplog: pytest.LogCaptureFixture) -> None:
    """The image's and the compose file's LMSERVE_* variables reach the gateway without a deprecation
    warning (one naming for every component: LMSERVE_HOST serves servers and gateways alike)."""
    from lmserve.gateway.config import load_config

    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    image_env = {"LMSERVE_HOST": "0.0.0.0"}
    dockerfile = (DOCKER_DIR / "Dockerfile").read_text()
    assert "LMSERVE_HOST=0.0.0.0" in dockerfile and "LMSERVE_GATEWAY_" not in dockerfile
    env = {**image_env, **{k: str(v).replace("${LMSERVE_ADMIN_KEY:-change-me}", "change-me")
                           for k, v in compose["services"]["gateway"]["environment"].items()}}
    caplog.set_level("WARNING", logger="lmserve.settings")
    config = load_config(COMPOSE_DIR / "gateway.yaml", env=env)
    assert caplog.records == []
    assert (config.admin_key, config.host) == ("change-me", "0.0.0.0")
