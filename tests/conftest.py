import pytest
import torch

from tests.tiny_models import build_model


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
