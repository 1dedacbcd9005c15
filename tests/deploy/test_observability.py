"""Every rule and dashboard query names only metrics a live server and gateway export, and runs on a
real Prometheus scraping them (non-empty where the metrics it reads have samples)."""

from __future__ import annotations

import re
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DASHBOARDS_DIR, RULES_DIR, LivePrometheus, LiveStack
from tests.deploy.promql import SYNTHETIC, dashboard_queries, exported_names, metric_names, rules

# Grafana's variables, as the test gives them to Prometheus: every model, a rate window that holds
# several 1 s scrapes.
_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$model_name": ".+", "$model": ".+"}


def _expand(expr: str) -> str:
    for name in sorted(_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, _VARIABLES[name])
    if "$" in expr:
        raise AssertionError(f"unknown dashboard variable in {expr!r}")
    return expr


def _exports(stack: LiveStack) -> tuple[set[str], set[str]]:
    allowed, produced = set(SYNTHETIC), set(SYNTHETIC)
    for url in (stack.server.url, stack.gateway.url):
        a, p = exported_names(stack.scrape(url))
        allowed |= a
        produced |= p
    return allowed, produced


def _recorded() -> set[str]:
    return {rule["record"] for rule in rules(RULES_DIR) if "record" in rule}


def test_rule_expressions_name_only_exported_metrics(live_stack: LiveStack) -> None:
    allowed, _ = _exports(live_stack)
    allowed |= _recorded()
    unknown = {}
    for rule in rules(RULES_DIR):
        missing = metric_names(rule["expr"]) - allowed
        if missing:
            unknown[rule.get("alert") or rule["record"]] = sorted(missing)
    assert not unknown, f"rules read metrics nothing exports: {unknown}"


def test_dashboard_queries_name_only_exported_metrics(live_stack: LiveStack) -> None:
    allowed, _ = _exports(live_stack)
    allowed |= _recorded()
    queries = list(dashboard_queries(DASHBOARDS_DIR))
    assert len({name for name, _, _ in queries}) >= 2, "expected the server and gateway dashboards"
    unknown = {f"{name}: {title}": sorted(metric_names(_expand(expr)) - allowed)
               for name, title, expr in queries if metric_names(_expand(expr)) - allowed}
    assert not unknown, f"dashboard panels read metrics nothing exports: {unknown}"


def test_server_exports_alerting_gauges(live_stack: LiveStack) -> None:
    """engine_alive, max_num_seqs and memory_limit_bytes feed LmserveEngineDead, LmserveUnderutilized and
    LmserveMemoryHigh."""
    text = live_stack.scrape(live_stack.server.url)
    assert re.search(r'^lmserve:engine_alive\{model_name="tiny"\} 1\.0$', text, re.M)
    assert re.search(r'^lmserve:max_num_seqs\{model_name="tiny"\} 256\.0$', text, re.M)
    limit = re.search(r"^lmserve:memory_limit_bytes ([0-9.e+]+)$", text, re.M)
    assert limit and float(limit.group(1)) > 2**20


def test_gateway_counts_tokens_and_rejections_per_key(live_stack: LiveStack) -> None:
    """The per-key series the gateway dashboard reads hold what the server reported and what was refused."""
    expected = sum(reported[1] for reported in live_stack.traffic.reported.values())
    deadline = time.monotonic() + 10  # a stream's usage is recorded just after its client saw [DONE]
    while True:
        families = text_string_to_metric_families(live_stack.scrape(live_stack.gateway.url))
        samples = [s for family in families for s in family.samples]
        completions = sum(s.value for s in samples if s.name == "lmserve_gateway_key_tokens_total"
                          and s.labels["kind"] == "completion")
        if completions == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for key_id, reported in live_stack.traffic.reported.items():
        tokens = {s.labels["kind"]: s.value for s in samples
                  if s.name == "lmserve_gateway_key_tokens_total" and s.labels["key"] == key_id}
        assert [tokens.get(kind, 0) for kind in ("prompt", "completion", "cached")] == reported
        assert reported[0] > 0 and reported[1] > 0
        refused = sum(s.value for s in samples
                      if s.name == "lmserve_gateway_key_rejections_total" and s.labels["key"] == key_id)
        assert refused == live_stack.traffic.num_rate_limited[key_id]
    added = [s.value for s in samples if s.name == "lmserve_gateway_added_latency_seconds_count"]
    assert added == [3]  # the two keys' answers that reached the server; not the cache hit or the 429


def test_every_query_runs_on_live_prometheus(live_stack: LiveStack, live_prometheus: LivePrometheus) -> None:
    _, produced = _exports(live_stack)
    failures, empty = [], []
    for rule in rules(RULES_DIR):
        answer = live_prometheus.query(rule["expr"])
        if answer.get("status") != "success":
            failures.append((rule.get("alert") or rule["record"], answer))
    for name, title, expr in dashboard_queries(DASHBOARDS_DIR):
        answer = live_prometheus.query(_expand(expr))
        if answer.get("status") != "success":
            failures.append((f"{name}: {title}", answer))
        elif metric_names(_expand(expr)) <= produced and not answer["data"]["result"]:
            empty.append(f"{name}: {title}: {expr}")
    assert not failures, failures
    assert not empty, f"queries over produced metrics returned nothing: {empty}"


def test_rules_loaded_by_live_prometheus(live_prometheus: LivePrometheus) -> None:
    groups = httpx.get(live_prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    defined = {rule.get("alert") or rule["record"] for rule in rules(RULES_DIR)}
    assert defined <= loaded
    unhealthy = [(rule["name"], rule.get("lastError")) for group in groups for rule in group["rules"]
                 if rule.get("health") == "err"]
    assert not unhealthy
