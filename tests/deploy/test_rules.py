"""The Prometheus rules: promtool accepts them, its unit tests pass, and every alert is tested both
firing and silent, carries a severity and points at an existing runbook page."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.conftest import REPO, RULES_DIR, require_tool
from tests.deploy.promql import rule_files, rules

RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "lmserve-alerts.test.yml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_every_rule_file() -> None:
    files = [str(path) for path in rule_files(RULES_DIR)]
    assert len(files) >= 2
    result = _promtool("check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = {rule["alert"] for rule in rules(RULES_DIR) if "alert" in rule}
    spec = yaml.safe_load(RULE_TESTS.read_text())
    assert sorted(spec["rule_files"]) == sorted(f"../rules/{path.name}" for path in rule_files(RULES_DIR))
    firing, silent = set(), set()
    for case in spec["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"


def test_every_alert_has_severity_and_runbook() -> None:
    for rule in rules(RULES_DIR):
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/runbooks/{rule['alert']}.md", url
        page = REPO / url
        assert page.is_file(), f"{rule['alert']}: no runbook page {url}"
        text = page.read_text()
        for heading in ("## What it means", "## Panels", "## What to do"):
            assert heading in text, f"{url} lacks {heading!r}"


def test_backend_down_contract_with_compose() -> None:
    """deploy-containers' compose test waits for this alert on these jobs."""
    (rule,) = [r for r in rules(RULES_DIR) if r.get("alert") == "LmserveBackendDown"]
    assert rule["expr"] == 'up{job=~"lmserve-server|lmserve-gateway"} == 0'
    assert rule["for"] == "1m"
