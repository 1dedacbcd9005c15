"""The stack file: the built-in default, a YAML file, CLI overrides, and refusals a user can act on."""

import pytest

from lmserve.stack.config import load_stack_config


def test_the_default_stack_is_two_demo_replicas_behind_port_8000(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSERVE_HOME", str(tmp_path))
    stack = load_stack_config(None)
    [model] = stack.models
    assert (model.name, model.model, model.replicas) == ("lmserve-demo", "demo", 2)
    assert (stack.port, stack.first_server_port, stack.home_dir) == (8000, 8100, tmp_path)


def test_a_file_with_cli_overrides(tmp_path):
    path = tmp_path / "stack.yaml"
    path.write_text("models:\n  - name: my-model\n    model: /models/m\n    replicas: 3\n"
                    "    serve: {max_num_seqs: 8}\nport: 9000\n")
    stack = load_stack_config(path, {"port": 9100, "home": str(tmp_path / "h"), "redis_url": None})
    [model] = stack.models
    assert (model.name, model.model, model.replicas, model.serve) == ("my-model", "/models/m", 3, {"max_num_seqs": 8})
    assert (stack.port, stack.first_server_port, stack.home_dir) == (9100, 9200, tmp_path / "h")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: []\n", "at least one model"),
        ("models:\n  - {name: a, replicas: 0}\n", "replicas must be >= 1"),
        ("models:\n  - {name: a, strategy: random}\n", "strategy must be one of"),
        ("models:\n  - {name: a, serve: {port: 1}}\n", "serve.port is set by the stack itself"),
        ("models:\n  - {name: a}\n  - {name: a}\n", "model names must be unique"),
        ("port: 8100\nfirst_server_port: 8099\n", "collides with server ports"),
        ("colour: blue\n", "unknown setting 'colour'"),
        ("- a list\n", "must hold a mapping"),
    ],
)
def test_refusals(tmp_path, text, message):
    path = tmp_path / "stack.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_stack_config(path)
