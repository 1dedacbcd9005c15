"""One settings layer for serve, gateway and up: the same names given the same way, one precedence,
old names still read with a warning, bad values refused in one line."""

import logging
import os
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from lmserve.gateway.cli import build_gateway_parser
from lmserve.gateway.config import GatewayConfig, load_config
from lmserve.server.cli import build_parser
from lmserve.server.settings import ServerOptions, ServeSettings, split_settings
from lmserve.settings import load_settings
from lmserve.stack.cli import build_up_parser
from lmserve.stack.config import StackConfig, load_stack_config
from tests.server.test_lifecycle import self_signed
from tests.services import REPO_ROOT, free_port, python_module, start_process

SHARED = {"host": "0.0.0.0", "port": 9123, "drain_seconds": 7.5, "log_level": "debug",
          "tls_certfile": "/tls/cert.pem", "tls_keyfile": "/tls/key.pem"}
"""Settings every command has, with values none of them has by default."""
UP_KEYS = ("host", "port", "drain_seconds", "log_level")
"""The ones `lmserve up` has too (it serves no TLS itself)."""


def serve_options(argv: list[str], env: dict[str, str], config: Path | None) -> ServerOptions:
    args = vars(build_parser().parse_args(["demo", *argv]))
    args.pop("config")
    return split_settings(load_settings(ServeSettings, args, config, environ=env))[0]


def gateway_config(argv: list[str], env: dict[str, str], config: Path | None) -> GatewayConfig:
    args = vars(build_gateway_parser().parse_args(argv))
    args.pop("config")
    return load_config(config, env=env, overrides=args)


def up_config(argv: list[str], env: dict[str, str], config: Path | None) -> StackConfig:
    args = vars(build_up_parser().parse_args(argv))
    args.pop("config")
    return load_stack_config(config, args, environ=env)


def given(way: str, settings: dict, tmp_path: Path) -> tuple[list[str], dict[str, str], Path | None]:
    """The same settings as flags, as environment variables, or as a YAML file."""
    if way == "flags":
        return [arg for key, value in settings.items() for arg in ("--" + key.replace("_", "-"), str(value))], {}, None
    if way == "environment":
        return [], {"LMSERVE_" + key.upper(): str(value) for key, value in settings.items()}, None
    path = tmp_path / f"{len(settings)}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return [], {}, path


@pytest.mark.parametrize("way", ["flags", "environment", "file"])
def test_serve_gateway_and_up_take_a_setting_under_one_name(tmp_path: Path, way: str) -> None:
    for read in (serve_options, gateway_config):
        settings = read(*given(way, SHARED, tmp_path))
        assert {key: getattr(settings, key) for key in SHARED} == SHARED, read.__name__
    up_settings = {key: SHARED[key] for key in UP_KEYS}
    stack = up_config(*given(way, up_settings, tmp_path))
    assert {key: getattr(stack, key) for key in UP_KEYS} == up_settings


def test_gateway_precedence_flags_then_environment_then_file_then_defaults(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("port: 9001\nlog_level: warning\ndrain_seconds: 3\ntimeouts: {connect: 1.5, total: 100}\n")
    env = {"LMSERVE_PORT": "9002", "LMSERVE_LOG_LEVEL": "error", "LMSERVE_TIMEOUTS__CONNECT": "0.5",
           "LMSERVE_GATEWAY_PORT": "9005",  # the former name loses to LMSERVE_PORT
           "LMSERVE_MAX_NUM_SEQS": "4", "LMSERVE_HOME": "/elsewhere"}  # other commands' settings: ignored
    config = gateway_config(["--port", "9003"], env, path)
    assert config.port == 9003  # flag over environment and file
    assert config.log_level == "error"  # environment over file
    assert (config.timeouts.connect, config.timeouts.total) == (0.5, 100)  # a section merges key by key
    assert config.drain_seconds == 3  # file over default
    assert config.ledger_flush_interval == 1.0  # default
    assert gateway_config([], env, path).port == 9002


def test_old_names_still_work_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lmserve.settings")
    server = serve_options(["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--drain-timeout", "5"], {}, None)
    assert (server.tls_certfile, server.tls_keyfile, server.drain_seconds) == ("c.pem", "k.pem", 5)
    path = tmp_path / "serve.yaml"
    path.write_text("drain_timeout: 3\n")
    assert serve_options([], {}, path).drain_seconds == 3
    assert serve_options([], {"LMSERVE_DRAIN_TIMEOUT": "4"}, None).drain_seconds == 4
    gateway = gateway_config([], {"LMSERVE_GATEWAY_ADMIN_KEY": "adm", "LMSERVE_GATEWAY_TIMEOUTS__CONNECT": "1"}, None)
    assert (gateway.admin_key, gateway.timeouts.connect) == ("adm", 1)
    assert up_config(["--redis", "redis://r:6379/0"], {}, None).redis_url == "redis://r:6379/0"
    warnings = [r.getMessage() for r in caplog.records]
    for line in ("lmserve serve: --ssl-certfile is deprecated, use --tls-certfile",
                 "lmserve serve: --drain-timeout is deprecated, use --drain-seconds",
                 "lmserve serve: drain_timeout is deprecated, use drain_seconds",
                 "lmserve serve: LMSERVE_DRAIN_TIMEOUT is deprecated, use LMSERVE_DRAIN_SECONDS",
                 "lmserve gateway: LMSERVE_GATEWAY_ADMIN_KEY is deprecated, use LMSERVE_ADMIN_KEY",
                 "lmserve gateway: LMSERVE_GATEWAY_TIMEOUTS__CONNECT is deprecated, use LMSERVE_TIMEOUTS__CONNECT",
                 "lmserve up: --redis is deprecated, use --redis-url"):
        assert line in warnings


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")}
    return subprocess.run(python_module("lmserve.cli", *args), capture_output=True, text=True, timeout=120,
                          env={**clean, "PYTHONPATH": str(REPO_ROOT), "LMSERVE_HOME": str(cwd), **env}, cwd=cwd)


@pytest.mark.parametrize("command", [["serve", "demo"], ["gateway"], ["up"]])
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_bad_value_is_one_line_and_exit_status_2(tmp_path: Path, command: list[str], how: str) -> None:
    if how == "flag":
        done = run_cli(*command, "--drain-seconds", "soon", env={}, cwd=tmp_path)
    else:
        done = run_cli(*command, env={"LMSERVE_LOG_LEVEL": "loud"}, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"lmserve {command[0]}: error:") and ("drain" in line or "log_level" in line), line


def test_one_environment_configures_a_server_and_a_gateway_alike(tmp_path: Path) -> None:
    """What compose and Helm do: the same LMSERVE_* variables for every component, each taking its own."""
    cert, key = self_signed(tmp_path)
    common = {"LMSERVE_TLS_CERTFILE": str(cert), "LMSERVE_TLS_KEYFILE": str(key), "LMSERVE_DRAIN_SECONDS": "1",
              "LMSERVE_LOG_LEVEL": "warning",
              "LMSERVE_ADMIN_KEY": "adm",  # the gateway's only
              "LMSERVE_KV_CACHE_MEMORY": str(64 * 2**20), "LMSERVE_WARMUP": "false"}  # the server's only
    (tmp_path / "gateway.yaml").write_text("models: [{name: m}]\ndatabase_url: sqlite:///" + str(tmp_path / "g.db"))
    server_port, gateway_port = free_port(), free_port()
    server = start_process(python_module("lmserve.cli", "serve", "demo"), server_port, tmp_path / "server.log",
                           env={**common, "LMSERVE_PORT": str(server_port)}, timeout=180, scheme="https",
                           ready_path="/ready")
    try:
        gateway = start_process(python_module("lmserve.cli", "gateway", "-c", str(tmp_path / "gateway.yaml")),
                                gateway_port, tmp_path / "gateway.log", scheme="https", timeout=60,
                                env={**common, "LMSERVE_PORT": str(gateway_port)})
        try:
            with httpx.Client(verify=str(cert), timeout=10) as http:
                assert http.get(server.url + "/health").status_code == 200
                assert http.get(gateway.url + "/health").status_code == 200
                admin = http.get(gateway.url + "/admin/backends", headers={"Authorization": "Bearer adm"})
                assert admin.status_code == 200, admin.text
            gateway.stop(20)
            assert "listening" not in gateway.log()  # an info line, below LMSERVE_LOG_LEVEL=warning
        finally:
            gateway.kill()
        assert server.stop(20) == 0
    finally:
        server.kill()
