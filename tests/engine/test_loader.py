"""Finding and loading model directories, and the errors when that fails."""

import json

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.engine.config import ModelConfig
from lmserve.engine.loader import ModelLoadError, load_model


def test_unknown_directory_is_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(ModelConfig(model=str(tmp_path / "nope")))
    assert "\n" not in str(err.value)


def test_hub_id_without_network_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="downloading it from the Hugging Face Hub failed") as err:
        load_model(ModelConfig(model="lmserve-test/no-such-model"))
    assert "\n" not in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(ModelConfig(model=str(tmp_path)))


def copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_safetensors(tiny_llama, tmp_path):
    broken = copy_model(tiny_llama, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:100] + b"\x00garbage" + data[200:])
    with pytest.raises(ModelLoadError, match="corrupt or unreadable weights file") as err:
        load_model(ModelConfig(model=str(broken)))
    assert "\n" not in str(err.value)


def test_missing_weights_and_unsupported_architecture(tiny_model_factory, tmp_path):
    path, hf = tiny_model_factory("llama3")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((path / "config.json").read_text())
    from safetensors.torch import save_file

    state = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, partial / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing 3 weights"):
        load_model(ModelConfig(model=str(partial)))
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyNewModel"]
    (partial / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported model architecture"):
        load_model(ModelConfig(model=str(partial)))


def test_sharded_checkpoint_loads_the_same_model(tiny_model_factory, tmp_path):
    path, hf = tiny_model_factory("qwen2")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_text((path / name).read_text())
    params = SamplingParams(max_tokens=8, temperature=0)
    prompt = [[5, 6, 7, 8, 9]]
    a = LLM(str(path), num_blocks=32).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    b = LLM(str(sharded), num_blocks=32).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(tiny_llama, dtype):
    name = str(dtype).removeprefix("torch.")
    loaded = load_model(ModelConfig(model=str(tiny_llama), dtype=name))
    assert loaded.dtype == dtype
    assert all(p.dtype == dtype for p in loaded.model.parameters())
    ref = LLM(str(tiny_llama), num_blocks=32)
    half = LLM(str(tiny_llama), num_blocks=32, dtype=name)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=1)
    a = ref.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0].outputs[0]
    b = half.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0].outputs[0]
    assert a.token_ids[0] == b.token_ids[0]
    assert a.logprobs[0].logprob == pytest.approx(b.logprobs[0].logprob, abs=0.1)


def test_max_model_len_beyond_positions_is_refused(tiny_llama):
    with pytest.raises(ModelLoadError, match="longer than the model's 1024 positions"):
        load_model(ModelConfig(model=str(tiny_llama), max_model_len=5000))
