"""Active probes under load: a probe timeout alone never ejects the last backends of a model; a
backend that refuses connections or answers 5xx still is ejected (issue 14 item 9)."""

from __future__ import annotations

from pathlib import Path

from tests.gateway.conftest import base_config
from tests.gateway.test_features import post, wait_until

# Probes time out after 0.3 s; the slow fake answers them after 2 s but serves requests at once.
HEALTH = {"probe_interval": 0.2, "probe_timeout": 0.3, "unhealthy_after": 1, "timeout_unhealthy_after": 2}
SLOW = 2.0


def _state(gw, model: str, i: int) -> dict:
    return gw.admin("GET", "/admin/health").json()["models"][model]["backends"][i]


def _probes_seen(backend, more_than: int):
    start = backend.stats()["health_probes"]
    return lambda: backend.stats()["health_probes"] >= start + more_than


def test_slow_probes_never_eject_the_only_backend_of_a_model(backends, gateway_factory, tmp_path: Path) -> None:
    a = backends("a")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}]}], health=HEALTH))
    key = gw.create_key()
    a.control(probe_delay=SLOW)
    # Probes of one backend run one after another, so once the fourth has arrived the previous
    # three have timed out: more than timeout_unhealthy_after.
    wait_until(_probes_seen(a, 4), timeout=30)
    state = _state(gw, "m", 0)
    assert state["probe_timeouts"] >= 2 and state["healthy"] is True and state["ready"] is True
    response = post(gw.url, key)
    assert response.status_code == 200 and response.headers["x-backend-name"] == "a"


def test_slow_backend_is_ejected_while_its_model_has_another_and_back_when_not(
        backends, gateway_factory, tmp_path: Path) -> None:
    a, b = backends("a"), backends("b")
    gw = gateway_factory(base_config(tmp_path, [{"name": "m", "backends": [{"url": a.url}, {"url": b.url}]}],
                                     health=HEALTH))
    key = gw.create_key()
    a.control(probe_delay=SLOW)
    wait_until(lambda: _state(gw, "m", 0)["healthy"] is False, timeout=30)
    assert {post(gw.url, key).headers["x-backend-name"] for _ in range(4)} == {"b"}
    b.kill()  # refused: a hard failure ejects b, and a, still answering requests, takes over
    wait_until(lambda: _state(gw, "m", 1)["healthy"] is False, timeout=30)
    wait_until(lambda: _state(gw, "m", 0)["healthy"] is True, timeout=30)
    assert post(gw.url, key).headers["x-backend-name"] == "a"
    a.control(probe_delay=0.0)
    wait_until(lambda: _state(gw, "m", 0)["probe_timeouts"] == 0, timeout=30)


def test_the_only_backend_is_still_ejected_when_it_refuses_or_answers_5xx(
        backends, gateway_factory, tmp_path: Path) -> None:
    a, b = backends("a"), backends("b")
    models = [{"name": "m", "backends": [{"url": a.url}]}, {"name": "n", "backends": [{"url": b.url}]}]
    gw = gateway_factory(base_config(tmp_path, models, health={**HEALTH, "unhealthy_after": 2}))
    key = gw.create_key()
    a.kill()
    wait_until(lambda: _state(gw, "m", 0)["healthy"] is False, timeout=30)
    response = post(gw.url, key)
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_healthy_backend"
    b.control(health=503)  # what an lmserve server with a dead engine answers
    wait_until(lambda: _state(gw, "n", 0)["healthy"] is False, timeout=30)
    assert post(gw.url, key, {"model": "n", "messages": [{"role": "user", "content": "hi"}]}).status_code == 503
