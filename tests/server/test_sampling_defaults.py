"""Sampling defaults from the model's generation_config.json: read, applied when a request omits
them, beaten by any value the request sends, and switched off by generation_config: none."""

import json
import shutil

import httpx
import pytest

from lmserve.demo_model import model_dir as demo_model_dir
from lmserve.server.protocol import CompletionRequest
from lmserve.server.sampling_defaults import read_sampling_defaults
from lmserve.server.settings import ServerOptions
from tests.server.conftest import MODEL_NAME


def test_the_demo_model_ships_temperature_and_top_p():
    assert read_sampling_defaults(demo_model_dir()) == {"temperature": 0.8, "top_p": 0.95}


def test_only_sampling_keys_are_taken(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
        "repetition_penalty": 1.1, "max_new_tokens": 99, "eos_token_id": [1, 2], "typical_p": None,
    }))
    assert read_sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                                                "repetition_penalty": 1.1}
    assert read_sampling_defaults(tmp_path / "missing") == {}


def test_an_invalid_value_names_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"top_p": 1.5}')
    with pytest.raises(ValueError, match=r"generation_config.json: top_p must be in \(0, 1\]"):
        read_sampling_defaults(tmp_path)


def test_request_values_win_over_defaults():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    omitted = CompletionRequest(model="m", prompt="x").sampling_params(8, None, defaults=defaults)
    assert (omitted.temperature, omitted.top_p, omitted.top_k, omitted.min_p, omitted.repetition_penalty) == (
        0.6, 0.9, 20, 0.05, 1.1)
    explicit = CompletionRequest(model="m", prompt="x", temperature=0, top_p=1, top_k=0, min_p=0,
                                 repetition_penalty=1).sampling_params(8, None, defaults=defaults)
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.min_p,
            explicit.repetition_penalty) == (0, 1, 0, 0, 1)
    openai = CompletionRequest(model="m", prompt="x").sampling_params(8, None)
    assert (openai.temperature, openai.top_p, openai.top_k, openai.min_p) == (1.0, 1.0, 0, 0.0)


def test_the_setting_accepts_auto_and_none_only():
    assert ServerOptions().generation_config == "auto"
    with pytest.raises(ValueError, match="generation_config must be auto or none"):
        ServerOptions(generation_config="vllm")


@pytest.fixture(scope="module")
def top_k_one_model(tiny_llama, tmp_path_factory):
    """The tiny model whose generation_config.json says top_k 1: a request that omits top_k samples greedily."""
    path = tmp_path_factory.mktemp("top-k-one")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.7, "top_k": 1}))
    return path


def complete(server, **fields) -> str:
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": 12, "ignore_eos": True, **fields}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_a_server_applies_the_models_defaults_unless_told_not_to(start_server, top_k_one_model):
    server = start_server(model=top_k_one_model)
    status = httpx.get(server.url + "/v1/status", timeout=10).json()
    assert status["sampling_defaults"] == {"temperature": 0.7, "top_k": 1}
    greedy = complete(server, temperature=0)
    # No top_k in the request: the model's top_k 1 makes every seed's sample the greedy answer.
    assert [complete(server, seed=seed) for seed in range(4)] == [greedy] * 4
    assert [complete(server, seed=seed, temperature=1.0) for seed in range(4)] == [greedy] * 4
    # An explicit top_k wins: seeded samples now leave the greedy path.
    assert any(complete(server, seed=seed, top_k=0) != greedy for seed in range(4))
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True}
    replies = [httpx.post(server.url + "/v1/chat/completions", json={**chat, **extra}, timeout=60).json()
               for extra in ({"temperature": 0}, {"seed": 3})]
    assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]

    plain = start_server("--generation-config", "none", model=top_k_one_model)
    assert httpx.get(plain.url + "/v1/status", timeout=10).json()["sampling_defaults"] == {}
    assert complete(plain, temperature=0) == greedy
    assert any(complete(plain, seed=seed) != greedy for seed in range(4))
