import subprocess
import sys
from pathlib import Path

import pytest

from lmserve.gateway.app import create_app
from lmserve.gateway.config import load_config
from lmserve.gateway.serve import uvicorn_config

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
    env = {"LMSERVE_PORT": "9001", "LMSERVE_TIMEOUTS__FIRST_BYTE": "7",
           "LMSERVE_REDIS_URL": "redis://x:6379/0", "UNRELATED": "1"}
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
    ("limits: {window_seconds: 0}", "limits.window_seconds must be > 0"),
    ("limits: {max_body_bytes: -1}", "limits.max_body_bytes must be > 0"),
    ("limits: {default_rpm: 0}", "limits.default_rpm must be > 0"),
    ("limits: {window_seconds: abc}", "wrong type"),
    ("cache: {ttl: 0}", "cache.ttl must be > 0"),
    ("cache: {max_entries: 0}", "cache.max_entries must be > 0"),
    ("redaction: {patterns: ['ok', '(unclosed']}", r"redaction.patterns\[1\] '\(unclosed' does not compile"),
    ("redaction: {max_match_chars: 0}", "redaction.max_match_chars must be > 0"),
    ("shedding: {low: 0}", r"shedding.low must be a fraction in \(0, 1\]"),
    ("shedding: {high: 1.5}", "shedding.high must be a fraction"),
    ("timeouts: {client_body: 0}", "timeouts.client_body must be > 0"),
    ("drain_seconds: -1", "drain_seconds must be >= 0"),
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


def test_bad_redaction_regex_is_a_one_line_cli_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("models: [{name: a}]\nredaction: {patterns: ['(unclosed']}\n")
    done = subprocess.run([sys.executable, "-m", "lmserve.cli", "gateway", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    assert "redaction.patterns[0]" in done.stderr


def test_drain_seconds_keeps_its_fraction(tmp_path: Path) -> None:
    config = load_config(env={}, overrides={"drain_seconds": 0.5, "timeouts": {"client_body": 2.5}})
    uv_config = uvicorn_config(config, create_app(config))
    assert uv_config.timeout_graceful_shutdown == 0.5  # was int(0.5) == 0: in-flight requests cut at once
    assert uv_config.http.body_timeout == 2.5  # type: ignore[union-attr]
