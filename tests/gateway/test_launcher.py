"""Models loaded on demand (issue 17): the gateway starts a model's server at its first request and
holds the request meanwhile, stops idle ones and evicts the least recently used to stay within a
memory budget; no request fails for it. Real `lmserve serve` processes on tiny models."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from lmserve.gateway.config import config_from_dict
from lmserve.stack.config import StackConfig
from lmserve.stack.up import Stack
from tests.gateway.conftest import base_config
from tests.tiny_models import build_model

MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for name, seed in (("a", 1), ("b", 2)):
        dirs[name] = tmp_path_factory.mktemp(f"launch-{name}")
        build_model("llama3", dirs[name], seed=seed)
    return dirs


def launch(model_dir: Path, tmp_path: Path, name: str, **extra: Any) -> dict[str, Any]:
    command = [sys.executable, "-m", "lmserve.cli", "serve", str(model_dir), "--port", "{port}", "--host",
               "127.0.0.1", "--served-model-name", "tiny", "--num-blocks", "128"]
    return {"command": command, "memory": 1.0, "idle_unload": 0, "load_timeout": 120,
            "log_file": str(tmp_path / f"launched-{name}.log"), **extra}


def models_config(tiny_dirs: dict[str, Path], tmp_path: Path, **launch_extra: dict[str, Any]) -> dict[str, Any]:
    models = [{"name": name, "upstream_model": "tiny",
               "launch": launch(path, tmp_path, name, **launch_extra.get(name, {}))}
              for name, path in tiny_dirs.items()]
    # The whole request, load included, is bounded by timeouts.total: room for a slow start on a busy machine.
    return base_config(tmp_path, models, launch_memory_budget=1.0, timeouts={"total": 300.0})


def metric(gw_url: str, name: str, **labels: str) -> float:
    text = httpx.get(gw_url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def states(gw: Any) -> dict[str, str]:
    return {name: m["state"] for name, m in gw.admin("GET", "/admin/models").json()["models"].items()}


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_alternating_models_under_a_budget_for_one_load_and_evict_without_failing(
        tiny_dirs: dict[str, Path], gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory(models_config(tiny_dirs, tmp_path))
    assert httpx.get(gw.url + "/ready").status_code == 200  # ready with nothing loaded: requests will wait
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.create_key(), max_retries=0, timeout=180)
    listed = {m.id: m.model_extra.get("lmserve_state") for m in client.models.list()}
    assert listed == {"a": "unloaded", "b": "unloaded"}

    started = time.monotonic()
    first = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=4)
    held = time.monotonic() - started
    assert first.choices[0].message.content is not None
    # The held request's latency includes the whole load.
    assert held >= metric(gw.url, "lmserve_gateway_model_load_seconds_sum", model="a") > 0

    for name in ("b", "a"):
        client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4)
    assert states(gw) == {"a": "loaded", "b": "unloaded"}
    assert metric(gw.url, "lmserve_gateway_model_loads_total", model="a") == 2
    assert metric(gw.url, "lmserve_gateway_model_unloads_total", model="a", reason="budget") == 1
    assert metric(gw.url, "lmserve_gateway_model_unloads_total", model="b", reason="budget") == 1

    # Concurrent, interleaved: each waits for the other's answer to end before it takes the memory.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda name: client.chat.completions.create(
            model=name, messages=MESSAGES, max_tokens=4), ["b", "a", "b", "a"]))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert metric(gw.url, "lmserve_gateway_requests_total", status="200") == 7


def test_pin_idle_unload_and_a_load_that_cannot_fit(tiny_dirs: dict[str, Path], gateway_factory: Any,
                                                    tmp_path: Path) -> None:
    gw = gateway_factory(models_config(tiny_dirs, tmp_path, a={"idle_unload": 2}, b={"load_timeout": 3}))
    key = gw.create_key()
    assert gw.admin("POST", "/admin/models/a/load", timeout=180).json()["state"] == "loaded"
    assert gw.admin("POST", "/admin/models/a/pin").json()["pinned"] is True
    refused = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": "b", "messages": MESSAGES, "max_tokens": 4}, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_loading"
    # Pinned: neither evicted for b nor stopped when idle (3 s > its idle_unload of 2 s by now).
    assert states(gw) == {"a": "loaded", "b": "unloaded"}

    gw.admin("POST", "/admin/models/a/unpin")
    wait_for(lambda: states(gw)["a"] == "unloaded", "a to unload when idle for 2 s")
    assert metric(gw.url, "lmserve_gateway_model_unloads_total", model="a", reason="idle") == 1
    assert gw.admin("POST", "/admin/models/a/load", timeout=180).json()["state"] == "loaded"
    gw.admin("POST", "/admin/models/a/unload")
    wait_for(lambda: states(gw)["a"] == "unloaded", "a to unload on the admin's word")
    assert metric(gw.url, "lmserve_gateway_model_unloads_total", model="a", reason="admin") == 1
    assert gw.admin("POST", "/admin/models/nope/load").status_code == 404
    assert gw.admin("POST", "/admin/models/a/explode").status_code == 400


def test_a_server_that_cannot_start_fails_its_request_at_once(gateway_factory: Any, tmp_path: Path) -> None:
    broken = {"command": [sys.executable, "-c", "import sys; sys.exit(3)", "{port}"], "load_timeout": 120}
    gw = gateway_factory(base_config(tmp_path, [{"name": "broken", "launch": broken}]))
    started = time.monotonic()
    response = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.create_key()}"},
                          json={"model": "broken", "messages": MESSAGES}, timeout=60)
    assert response.status_code == 503 and time.monotonic() - started < 60
    error = response.json()["error"]
    assert error["code"] == "model_load_failed" and "status 3" in error["message"]


def test_a_launched_server_dies_with_a_killed_gateway(tiny_dirs: dict[str, Path], gateway_factory: Any,
                                                      tmp_path: Path) -> None:
    gw = gateway_factory(models_config(tiny_dirs, tmp_path))
    url = gw.admin("POST", "/admin/models/a/load", timeout=180).json()["url"]
    assert httpx.get(url + "/health").status_code == 200
    gw.proc.popen.send_signal(signal.SIGKILL)

    def gone() -> bool:
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.TransportError:
            return True
        return False

    wait_for(gone, "the launched server to exit after its gateway was killed")


@pytest.mark.parametrize("bad, message", [
    ({"command": ["lmserve", "serve"]}, "placeholder"),
    ({"command": ["x", "{port}"], "memory": 0}, "memory"),
    ({"command": ["x", "{port}"], "typo": 1}, "unknown setting"),
])
def test_bad_launch_settings_are_refused(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_dict({"models": [{"name": "m", "launch": bad}]})
    with pytest.raises(ValueError, match="could never load"):
        config_from_dict({"models": [{"name": "m", "launch": {"command": ["x", "{port}"], "memory": 4}}],
                          "launch_memory_budget": 2})
    with pytest.raises(ValueError, match="no `backends`"):
        config_from_dict({"models": [{"name": "m", "launch": {"command": ["x", "{port}"]},
                                      "backends": [{"url": "http://127.0.0.1:1"}]}]})


def test_lmserve_up_hands_on_demand_models_to_the_gateway(tmp_path: Path) -> None:
    config = StackConfig(models=[{"name": "always", "replicas": 1},
                                 {"name": "sometimes", "on_demand": True, "replicas": 1, "memory": 2, "idle_unload": 60}],
                         home=str(tmp_path), memory_budget=3)
    stack = Stack(config, say=lambda _: None)
    stack.backend_key = "srv-test"
    gateway = config_from_dict(yaml.safe_load(stack._write_gateway_config().read_text()))
    by_name = {m.name: m for m in gateway.models}
    assert by_name["sometimes"].launch is not None and not by_name["sometimes"].backends
    launch_config = by_name["sometimes"].launch
    assert launch_config.memory == 2 and launch_config.idle_unload == 60 and launch_config.api_key == "srv-test"
    assert re.search(r"serve demo --port \{port\} .*--served-model-name sometimes", " ".join(launch_config.command))
    assert gateway.launch_memory_budget == 3 and config.num_servers == 1
    with pytest.raises(ValueError, match="replicas: 1"):
        StackConfig(models=[{"name": "x", "on_demand": True, "replicas": 2}])
