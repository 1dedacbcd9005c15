from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from tests.services import Process, free_port, python_module, start_process
from tests.tiny_models import build_model

SERVED_MODEL_NAME = "tiny"


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Builds (once per session) a tiny random model of a family; returns (path, HF model)."""
    built = {}

    def get(family: str = "llama3", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(family)
            built[key] = (path, build_model(family, path, **overrides))
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama3")[0]


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    torch.set_num_threads(2)


def serve_args(model: Path, port: int, *flags: str) -> list[str]:
    return python_module("lmserve.cli", "serve", str(model), "--port", str(port),
                         "--served-model-name", SERVED_MODEL_NAME, "--num-blocks", "512", *flags)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory) -> Iterator[Callable[..., Process]]:
    """Starts servers on the tiny Llama (or `model=`); every one is stopped at the end."""
    started: list[Process] = []

    def start(*flags: str, model: Path | None = None, env: dict[str, str] | None = None,
              scheme: str = "http") -> Process:
        if model is None:
            model = tmp_path_factory.getbasetemp() / "server-model"
            if not (model / "config.json").exists():
                build_model("llama3", model)
        port = free_port()
        log = tmp_path_factory.mktemp("serve") / "server.log"
        proc = start_process(serve_args(model, port, *flags), port, log, ready_path="/ready",
                             env=env, timeout=90, scheme=scheme)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def server(start_server) -> Process:
    return start_server()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
