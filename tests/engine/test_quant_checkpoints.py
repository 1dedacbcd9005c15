"""GPTQ and AWQ checkpoints, packed here as their formats define, loaded for Llama and Qwen models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lmserve.engine.attention import ForwardContext, SequenceSlice, make_backend
from lmserve.engine.config import ModelConfig
from lmserve.engine.loader import ModelLoadError, load_model
from lmserve.engine.models.weights import iter_safetensors, safetensors_files
from lmserve.engine.quant_checkpoints import dequantizing_weights, read_checkpoint_quantization
from lmserve.engine.quantization import Int4Weights, QuantizedLinear
from tests.engine.quant_packing import LayerInts, write_quantized_checkpoint

GROUP_SIZE = 32
PROMPT = [5, 17, 99, 3, 250, 41, 7, 8, 300, 12, 77, 64, 2, 9, 480, 33, 21]
FORMATS = ["gptq", "gptq_v2", "awq"]


@pytest.fixture(scope="module")
def checkpoints(tiny_model_factory, tmp_path_factory):
    """(path, integers by layer, the HF float model holding the reference dequantized weights)."""
    built = {}

    def get(family: str, method: str):
        if (family, method) not in built:
            src, hf = tiny_model_factory(family)
            dst = tmp_path_factory.mktemp(f"{family}-{method}")
            layers = write_quantized_checkpoint(hf, src, dst, method, GROUP_SIZE)
            reference = copy.deepcopy(hf)
            with torch.no_grad():
                for prefix, ints in layers.items():
                    reference.get_submodule(prefix).weight.copy_(ints.dequantize())
            built[family, method] = (dst, layers, reference)
        return built[family, method]

    return get


def read_integers(path: Path) -> dict[str, Int4Weights]:
    quant = read_checkpoint_quantization(path, json.loads((path / "config.json").read_text()))
    assert quant is not None
    found: dict[str, Int4Weights] = {}
    floats = dict(dequantizing_weights(iter_safetensors(safetensors_files(path)), quant, found))
    for prefix, int4 in found.items():
        assert torch.equal(floats[f"{prefix}.weight"], int4.dequantize())
    return found


@pytest.mark.parametrize("method", FORMATS)
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_unpacked_integers_and_weights_equal_the_packed_ones(checkpoints, family, method):
    path, layers, _ = checkpoints(family, method)
    found = read_integers(path)
    assert found.keys() == layers.keys()
    for prefix, ints in layers.items():
        got = found[prefix]
        assert got.group_size == GROUP_SIZE
        assert torch.equal(got.q.long(), torch.from_numpy(ints.q)), prefix
        assert torch.equal(got.zeros.long(), torch.from_numpy(ints.zeros)), prefix
        assert torch.equal(got.scales, ints.scales.float()), prefix
        assert torch.equal(got.dequantize(), ints.dequantize()), prefix


def forward_logits(path: Path, ids: list[int], **settings) -> torch.Tensor:
    loaded = load_model(ModelConfig(model=str(path), dtype="float32", **settings))
    model = loaded.model
    backend = make_backend("torch", torch.device("cpu"), 16)
    caches = backend.allocate_cache(model.num_layers, 4, 16, model.num_kv_heads, model.head_dim, torch.float32,
                                    torch.device("cpu"))
    n = len(ids)
    meta = backend.build_metadata([SequenceSlice(0, n, n, [0, 1])], torch.arange(n), torch.device("cpu"))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), ForwardContext(backend, meta, caches)))


@pytest.mark.parametrize("method", FORMATS)
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_logits_match_the_float_model_of_the_dequantized_weights(checkpoints, family, method):
    path, _, reference = checkpoints(family, method)
    with torch.inference_mode():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    loaded = load_model(ModelConfig(model=str(path)))
    assert loaded.quantization == method.removesuffix("_v2")
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * 2 and all(m.bits == 4 and m.group_size == GROUP_SIZE for m in layers)
    assert loaded.weight_bytes < loaded.unquantized_weight_bytes
    torch.testing.assert_close(forward_logits(path, PROMPT), expected, rtol=1e-4, atol=1e-4)
    # Run dequantized (quantization none), the loaded weights are the reference ones exactly.
    torch.testing.assert_close(forward_logits(path, PROMPT, quantization="none"), expected, rtol=1e-5, atol=1e-5)


def test_dequantized_load_holds_the_reference_weights_exactly(checkpoints):
    path, layers, _ = checkpoints("llama3", "gptq")
    model = load_model(ModelConfig(model=str(path), quantization="none", linear_backend="torch")).model
    attn = model.model.layers[1].self_attn
    expected = torch.cat([layers[f"model.layers.1.self_attn.{p}"].dequantize() for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn.qkv_proj.weight, expected)


def rewrite_config(path: Path, dst: Path, **quantization_config) -> Path:
    dst.mkdir()
    for f in path.iterdir():
        (dst / f.name).symlink_to(f)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(quantization_config)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_checkpoints_are_refused_in_one_line(checkpoints, tiny_llama, tmp_path):
    path, layers, _ = checkpoints("llama3", "gptq")
    eight_bits = rewrite_config(path, tmp_path / "bits8", bits=8)
    with pytest.raises(ModelLoadError, match="gptq checkpoints of 8 bits are not supported .*--quantization int8"):
        load_model(ModelConfig(model=str(eight_bits)))
    marlin = rewrite_config(path, tmp_path / "marlin", checkpoint_format="marlin")
    with pytest.raises(ModelLoadError, match="checkpoint_format 'marlin' is not supported"):
        load_model(ModelConfig(model=str(marlin)))
    other = rewrite_config(path, tmp_path / "fp8", quant_method="fp8")
    with pytest.raises(ModelLoadError, match="quantized with 'fp8' are not supported"):
        load_model(ModelConfig(model=str(other)))
    with pytest.raises(ModelLoadError, match="is a gptq checkpoint: use quantization auto or gptq"):
        load_model(ModelConfig(model=str(path), quantization="int8"))
    with pytest.raises(ModelLoadError, match="quantization awq needs a checkpoint quantized with awq"):
        load_model(ModelConfig(model=str(tiny_llama), quantization="awq"))


def test_act_order_checkpoint_is_refused(checkpoints, tmp_path):
    """desc_act=true reorders the groups (g_idx not ascending): refused by name, not loaded wrong."""
    from safetensors.torch import load_file, save_file

    path, _, _ = checkpoints("llama3", "gptq")
    dst = rewrite_config(path, tmp_path / "act-order", desc_act=True)
    tensors = load_file(str(path / "model.safetensors"))
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    tensors["model.layers.0.mlp.down_proj.g_idx"] = g_idx.flip(0).contiguous()
    (dst / "model.safetensors").unlink()
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="down_proj: g_idx is not in input order: .*desc_act=true"):
        load_model(ModelConfig(model=str(dst)))


def test_layer_ints_reference_is_what_the_formats_define():
    """The test's own reference: (q - zero) * scale per group of consecutive input columns."""
    import numpy as np

    ints = LayerInts(np.array([[0, 15, 3, 4]]), np.array([[8, 1]]), torch.tensor([[0.5, 2.0]]).half(), 2)
    assert ints.dequantize().tolist() == [[-4.0, 3.5, 4.0, 6.0]]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_greedy_tokens_equal_the_dequantized_float_model(checkpoints, method):
    from lmserve import LLM, SamplingParams

    path, _, _ = checkpoints("qwen2", method)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:5], [44, 45, 46]]
    as_int4 = LLM(str(path), num_blocks=64).generate(prompts, params, use_tqdm=False)
    as_float = LLM(str(path), num_blocks=64, quantization="none").generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in as_int4] == [o.outputs[0].token_ids for o in as_float]
