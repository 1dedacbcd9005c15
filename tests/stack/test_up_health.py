"""What `lmserve up` sets up for health: its gateway does not eject a server after one slow probe,
its servers are watched by the supervisor, and the watch's settings are checked."""

from __future__ import annotations

import pytest

from lmserve.gateway.config import load_config
from lmserve.stack.config import load_stack_config
from lmserve.stack.up import Stack


def test_the_generated_gateway_does_not_eject_a_server_after_one_slow_probe(tmp_path) -> None:
    stack = Stack(load_stack_config(None, {"home": str(tmp_path)}), say=lambda _: None)
    health = load_config(stack._write_gateway_config(), env={}).health
    assert health.timeout_unhealthy_after >= 3  # a slow probe under load is not a dead server
    assert health.unhealthy_after >= 2


def test_servers_are_health_watched(tmp_path) -> None:
    config = load_stack_config(None, {"home": str(tmp_path), "health_check_interval": 2.0,
                                      "restart_unhealthy_after": 4})
    watch = Stack(config, say=lambda _: None).supervisor.watch
    assert (watch.interval, watch.timeout, watch.restart_after) == (2.0, 5.0, 4)


@pytest.mark.parametrize(("text", "message"), [
    ("health_check_interval: 0\n", "health_check_interval must be > 0"),
    ("health_check_timeout: -1\n", "health_check_timeout must be > 0"),
    ("restart_unhealthy_after: 0\n", "restart_unhealthy_after must be >= 1"),
])
def test_health_watch_refusals(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_stack_config(path)
