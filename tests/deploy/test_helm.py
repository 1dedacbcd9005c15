"""The Helm chart: lints strictly, renders for dev / staging / prod, every manifest validates against
the Kubernetes 1.30 schemas in strict mode, and the rendered objects have the properties that make
the deployment work (probes, draining, discovery, isolation, autoscaling, availability)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import RULES_DIR
from tests.deploy.helm_render import (
    KUBE_VERSION,
    NAMESPACE,
    VALUES_FILES,
    by_kind,
    component,
    lint,
    render,
    render_file,
    values,
)
from tests.deploy.promql import rules

CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_lints_strictly(values_file: str) -> None:
    report = lint(values(values_file))
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_manifest_validates_against_kubernetes_1_30(values_file: str, tmp_path: Path) -> None:
    docs = [doc for doc in render_file(values_file) if doc["kind"] not in CRD_KINDS]
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        paths.append(str(path))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run([str(cli), "--strict", "-k", KUBE_VERSION.lstrip("v"), *paths],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "INFO" in result.stdout and "ERROR" not in result.stdout


def test_crds_have_the_structure_their_operators_read() -> None:
    staging, prod = render_file("values-staging.yaml"), render_file("values-prod.yaml")
    for doc in by_kind(prod, "ServiceMonitor"):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        (endpoint,) = doc["spec"]["endpoints"]
        assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
        (relabel,) = endpoint["relabelings"]
        assert relabel["targetLabel"] == "job"
    jobs = {doc["spec"]["endpoints"][0]["relabelings"][0]["replacement"] for doc in by_kind(prod, "ServiceMonitor")}
    assert jobs == {"lmserve-server", "lmserve-gateway"}
    (rule,) = by_kind(prod, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    shipped = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    source = list(rules(RULES_DIR))
    assert [r.get("alert") or r["record"] for r in shipped] == [r.get("alert") or r["record"] for r in source]
    assert [r["expr"] for r in shipped] == [r["expr"] for r in source]
    assert all(r["annotations"]["summary"] == s["annotations"]["summary"] for r, s in zip(shipped, source)
               if "alert" in r), "templates in annotations must reach Prometheus untouched"
    (scaled,) = by_kind(staging, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "lmserve-model-llama-3-1-8b"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "lmserve:num_requests_waiting" in trigger["metadata"]["query"]
    assert 'model_name="llama-3.1-8b"' in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_runbook_urls_get_the_base_url() -> None:
    docs = render({**values("values-prod.yaml"), "runbookBaseUrl": "https://git.example.com/lmserve/-/blob/main/"})
    (rule,) = by_kind(docs, "PrometheusRule")
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert urls and all(re.fullmatch(r"https://git\.example\.com/lmserve/-/blob/main/docs/runbooks/Lmserve\w+\.md", u)
                        for u in urls), urls


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_model_servers_probe_health_and_ready_and_drain(values_file: str) -> None:
    docs = render_file(values_file)
    models = values(values_file)["models"]
    deployments = component(docs, "Deployment", "model-server")
    assert len(deployments) == len(models)
    for deployment, model in zip(sorted(deployments, key=lambda d: d["metadata"]["name"]),
                                 sorted(models, key=lambda m: re.sub("[^a-z0-9-]", "-", m["name"].lower()))):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        (port,) = container["ports"]
        assert port["containerPort"] == model["port"] and port["name"] == "http"
        args = container["args"]
        assert args[:2] == ["serve", model["model"]]
        assert args[args.index("--port") + 1] == str(model["port"])
        assert args[args.index("--served-model-name") + 1] == model["name"]
        assert args[args.index("--host") + 1] == "0.0.0.0"
        # The batch size is given once; the autoscaler's waiting target is relative to it.
        assert args.count("--max-num-seqs") == (1 if model.get("maxNumSeqs") or "--max-num-seqs" in model["args"] else 0)
        if model.get("maxNumSeqs"):
            assert args[args.index("--max-num-seqs") + 1] == str(model["maxNumSeqs"])
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert container["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= model["startupSeconds"]
        # Draining: the pre-stop pause, then the server's own drain, fit in the grace period.
        drain = float(args[args.index("--drain-seconds") + 1])
        assert drain == model["drainSeconds"]
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pause > values(values_file).get("gateway", {}).get("resolveInterval", 10)
        assert pod["terminationGracePeriodSeconds"] > pause + drain
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        gpu = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpu == (model["gpu"] or None)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_gateway_discovers_pods_through_headless_services(values_file: str) -> None:
    docs = render_file(values_file)
    headless = {s["metadata"]["name"]: s for s in component(docs, "Service", "model-server")}
    assert all(s["spec"]["clusterIP"] == "None" for s in headless.values())
    (configmap,) = component(docs, "ConfigMap", "gateway")
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert len(config["models"]) == len(values(values_file)["models"])
    for model in config["models"]:
        (backend,) = model["backends"]
        match = re.fullmatch(rf"http://([a-z0-9-]+)\.{NAMESPACE}\.svc\.cluster\.local:(\d+)", backend["url"])
        assert match and match.group(1) in headless, backend
        service = headless[match.group(1)]
        assert service["spec"]["ports"][0]["port"] == int(match.group(2))
        assert backend["discovery"] == "dns" and backend["resolve_interval"] > 0
        # The headless Service selects exactly that model's pods.
        (deployment,) = [d for d in component(docs, "Deployment", "model-server")
                         if d["metadata"]["name"] == match.group(1)]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert model["name"] == deployment["spec"]["template"]["spec"]["containers"][0]["args"][
            deployment["spec"]["template"]["spec"]["containers"][0]["args"].index("--served-model-name") + 1]


def test_static_discovery_gives_plain_backend_urls() -> None:
    docs = render({**values("values-dev.yaml"), "gateway": {**values("values-dev.yaml")["gateway"],
                                                             "backendDiscovery": "static"}})
    (configmap,) = component(docs, "ConfigMap", "gateway")
    (backend,) = yaml.safe_load(configmap["data"]["gateway.yaml"])["models"][0]["backends"]
    assert set(backend) == {"url"}


@pytest.mark.parametrize("values_file", ["values-staging.yaml", "values-prod.yaml"])
def test_network_policy_admits_only_gateway_and_prometheus(values_file: str) -> None:
    docs = render_file(values_file)
    (policy,) = by_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    model_pods = component(docs, "Deployment", "model-server")[0]["spec"]["template"]["metadata"]["labels"]
    selector = spec["podSelector"]["matchLabels"]
    assert selector.items() <= model_pods.items() and selector["app.kubernetes.io/component"] == "model-server"
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    gateway, prometheus = rule["from"]
    gateway_pods = component(docs, "Deployment", "gateway")[0]["spec"]["template"]["metadata"]["labels"]
    assert gateway["podSelector"]["matchLabels"].items() <= gateway_pods.items()
    assert "namespaceSelector" not in gateway  # this namespace only
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert "namespaceSelector" in prometheus
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    # Redis and PostgreSQL pods are not model servers: the policy leaves them alone.
    for kind in ("Deployment", "StatefulSet"):
        for other in by_kind(docs, kind):
            labels = other["spec"]["template"]["metadata"]["labels"]
            if labels["app.kubernetes.io/component"] != "model-server":
                assert not selector.items() <= labels.items()


def test_prod_hpa_scales_on_waiting_requests_per_pod() -> None:
    docs = render_file("values-prod.yaml")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    deployments = {d["metadata"]["name"]: d for d in component(docs, "Deployment", "model-server")}
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == set(deployments)
    for hpa in hpas:
        assert hpa["apiVersion"] == "autoscaling/v2"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == "lmserve_num_requests_waiting"
        assert metric["pods"]["target"]["type"] == "AverageValue"
        assert hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
        # The HPA owns the replica count.
        assert "replicas" not in deployments[hpa["spec"]["scaleTargetRef"]["name"]]["spec"]
    (adapter,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("prometheus-adapter")]
    (adapter_rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert adapter_rule["seriesQuery"].startswith("lmserve:num_requests_waiting{")
    assert adapter_rule["name"]["as"] == "lmserve_num_requests_waiting"
    assert set(adapter_rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_prod_is_highly_available_with_tls() -> None:
    docs = render_file("values-prod.yaml")
    (gateway,) = component(docs, "Deployment", "gateway")
    assert gateway["spec"]["replicas"] > 1
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert len(pdbs) == 1 + len(values("values-prod.yaml")["models"])
    for deployment in by_kind(docs, "Deployment"):
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert any(p["spec"]["selector"]["matchLabels"] == labels for p in pdbs), deployment["metadata"]["name"]
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http", "scheme": "HTTPS"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "lmserve-gateway-tls"
    (configmap,) = component(docs, "ConfigMap", "gateway")
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")["mountPath"]
    assert config["tls_certfile"] == f"{mount}/tls.crt" and config["tls_keyfile"] == f"{mount}/tls.key"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["LMSERVE_DATABASE_URL"] == {"name": "lmserve-gateway", "key": "database-url"}
    assert pod["terminationGracePeriodSeconds"] > config["drain_seconds"]


def test_dev_gateway_secret_and_sqlite() -> None:
    docs = render_file("values-dev.yaml")
    (secret,) = by_kind(docs, "Secret")
    assert secret["stringData"]["admin-key"] == "dev-admin-key"
    assert secret["stringData"]["database-url"].startswith("sqlite:////data/")
    assert "redis-url" not in secret["stringData"]
    assert by_kind(docs, "HorizontalPodAutoscaler") == [] and by_kind(docs, "PodDisruptionBudget") == []


def test_in_chart_datastores_wire_the_gateway() -> None:
    base = values("values-dev.yaml")
    docs = render({**base, "gateway": {**base["gateway"], "replicas": 2},
                   "redis": {"enabled": True}, "postgresql": {"enabled": True, "password": "pw"}})
    (secret,) = [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("-gateway")]
    assert secret["stringData"]["database-url"] == "postgresql+psycopg://lmserve:pw@lmserve-postgresql:5432/lmserve"
    assert secret["stringData"]["redis-url"] == "redis://lmserve-redis:6379/0"
    assert {s["metadata"]["name"] for s in by_kind(docs, "Service")} >= {"lmserve-postgresql", "lmserve-redis"}


def test_default_batch_size_and_waiting_target_are_the_measured_ones() -> None:
    """values.yaml's demo model scales out where benchmarks/hpa_target.py saw TTFT climb: its
    recommendation, written to RESULTS.md, is what the chart ships."""
    results = (Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.md").read_text()
    section = results.split("<!-- BEGIN hpa_target -->", 1)[1].split("<!-- END hpa_target -->", 1)[0]
    found = re.search(r"`maxNumSeqs: (\d+)` and `targetWaitingPerPod: ([\d.]+)`", section)
    assert found, "RESULTS.md has no hpa_target recommendation"
    (model,) = values("values.yaml")["models"]
    assert model["model"] == "demo"
    assert model["maxNumSeqs"] == int(found.group(1))
    assert model["autoscaling"]["targetWaitingPerPod"] == float(found.group(2))


@pytest.mark.parametrize("bad, message", [
    ({"gateway": {"replicas": 2, "adminKey": "k"}}, "shared key database"),
    ({"gateway": {"adminKey": ""}}, "gateway.adminKey is required"),
    ({"gateway": {"adminKey": "k", "backendDiscovery": "consul"}}, "backendDiscovery"),
    ({"gateway": {"adminKey": "k"}, "models": [{"name": "m", "model": "demo", "port": 8000,
                                                 "autoscaling": {"mode": "sometimes"}}]}, "mode"),
    ({"gateway": {"adminKey": "k"}, "models": [{**values("values.yaml")["models"][0], "maxNumSeqs": 8,
                                                 "args": ["--max-num-seqs", "8"]}]}, "batch size once"),
])
def test_bad_values_are_refused_with_a_message(bad: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        render(bad)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rendered_gateway_config_loads_in_the_gateway(values_file: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The ConfigMap's gateway.yaml plus the Secret's variables is a config the gateway accepts."""
    from lmserve.gateway.config import load_config

    docs = render_file(values_file)
    (configmap,) = component(docs, "ConfigMap", "gateway")
    path = tmp_path / "gateway.yaml"
    path.write_text(configmap["data"]["gateway.yaml"])
    # The Secret's values under the variable names the chart gives them: the gateway must read them
    # as its current names (a former LMSERVE_GATEWAY_* name would log a deprecation warning).
    secret = {"admin-key": "k", "database-url": "sqlite:////data/g.db", "redis-url": "redis://r:6379/0"}
    (gateway,) = component(docs, "Deployment", "gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: secret[e["valueFrom"]["secretKeyRef"]["key"]] for e in container["env"] if "valueFrom" in e}
    caplog.set_level(logging.WARNING, logger="lmserve.settings")
    config = load_config(path, env=env)
    assert caplog.records == []
    assert [m.name for m in config.models] == [m["name"] for m in values(values_file)["models"]]
    assert all(b.discovery == "dns" for m in config.models for b in m.backends)
    assert config.host == "0.0.0.0" and config.admin_key == "k"
    assert (config.database_url, config.redis_url) == ("sqlite:////data/g.db", "redis://r:6379/0")


def test_server_and_gateway_take_lmserve_settings_the_same_way() -> None:
    """`env` on a model and on the gateway is the same LMSERVE_* mechanism; drainTimeout, drainSeconds'
    former name, still renders the server's --drain-seconds."""
    base = values("values-dev.yaml")
    model = {k: v for k, v in base["models"][0].items() if k != "drainSeconds"}
    docs = render({**base, "gateway": {**base["gateway"], "env": {"LMSERVE_LOG_LEVEL": "debug"}},
                   "models": [{**model, "drainTimeout": 45, "env": {"LMSERVE_LOG_LEVEL": "debug"}}]})
    (gateway,) = component(docs, "Deployment", "gateway")
    (server,) = component(docs, "Deployment", "model-server")
    for deployment in (gateway, server):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert {"name": "LMSERVE_LOG_LEVEL", "value": "debug"} in container["env"]
    (container,) = server["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--drain-seconds") + 1] == "45"
