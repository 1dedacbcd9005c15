from pathlib import Path

import pytest

from lmserve.gateway.config import load_config

YAML = """
models:
  - name: llama
    strategy: least_outstanding
    aliases: [llama-latest]
    fallbacks: [qwen]
    backends:
      - {url: "http://127.0.0.1:8001/", weight: 2}
      - {url: "http://127.0.0.1:8002", api_key: secret}
  - name: qwen
    backends: [{url: "http://127.0.0.1:8003"}]
canaries:
  chat: {llama: 90, qwen: 10}
timeouts: {connect: 1.5}
limits: {default_rpm: 100}
"""


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(YAML)
    env = {"LMSERVE_GATEWAY_PORT": "9001", "LMSERVE_GATEWAY_TIMEOUTS__FIRST_BYTE": "7",
           "LMSERVE_GATEWAY_REDIS_URL": "redis://x:6379/0", "UNRELATED": "1"}
    config = load_config(path, env=env, overrides={"port": 9002, "admin_key": None})
    assert config.port == 9002
    assert config.redis_url == "redis://x:6379/0"
    assert config.timeouts.connect == 1.5 and config.timeouts.first_byte == 7 and config.timeouts.total == 600
    llama = config.models[0]
    assert llama.backends[0].url == "http://127.0.0.1:8001" and llama.backends[0].weight == 2
    assert llama.backends[1].api_key == "secret"
    assert config.canaries == {"chat": {"llama": 90, "qwen": 10}}
    assert config.limits.default_rpm == 100


@pytest.mark.parametrize("yaml_text, message", [
    ("models: [{name: a, strategy: random}]", "strategy must be one of"),
    ("models: [{name: a, backends: [{url: 'ftp://x'}]}]", "must start with http"),
    ("models: [{name: a, backends: [{url: 'http://x', weight: 0}]}]", "weight must be > 0"),
    ("models: [{name: a, fallbacks: [b]}]", "fallback 'b' is not a configured model"),
    ("models: [{name: a}, {name: b, aliases: [a]}]", "defined twice"),
    ("models: [{name: a}]\ncanaries: {c: {z: 1}}", "'z' is not a configured model"),
    ("timeouts: {connect: 0}", "timeouts.connect must be > 0"),
    ("models: [{name: a}]\nport: 70000", "port must be"),
    ("bogus: 1", "unknown setting"),
    ("jwt: {issuer: x}", "jwt needs"),
])
def test_invalid_config_is_a_clear_value_error(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        load_config(path, env={})


def test_example_config_loads() -> None:
    config = load_config(Path(__file__).parents[2] / "lmserve" / "gateway" / "example.yaml", env={})
    assert [m.name for m in config.models] == ["llama-3.1-8b", "qwen2.5-7b"]
    assert config.models[0].strategy == "prefix_affinity" and config.cache.enabled
