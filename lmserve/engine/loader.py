"""Finding a model directory and building the model from it with its weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmserve.engine.config import ModelConfig
from lmserve.engine.linear import choose_linear_backend, pack_linears
from lmserve.engine.models import CausalLM, model_class
from lmserve.engine.models.weights import iter_safetensors, safetensors_files
from lmserve.engine.quant_checkpoints import (
    CheckpointQuantization,
    dequantizing_weights,
    read_checkpoint_quantization,
)
from lmserve.engine.quantization import Int4Weights, quantize_model, weight_bytes

DEMO_MODEL_NAMES = ("demo", "lmserve-demo")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model cannot be found or loaded; the message is one line a user can act on."""


@dataclass
class LoadedModel:
    model: CausalLM
    model_dir: Path
    hf_config: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    eos_token_ids: list[int]
    quantization: str = "none"
    """none, int8, int4, gptq or awq: how the decoder's linear layers hold their weights."""
    weight_bytes: int = 0
    """Bytes of the weights as loaded (quantized ones at their integer size)."""
    unquantized_weight_bytes: int = 0
    """Bytes the same weights take in dtype."""


def demo_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "demo_model"


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory as is; `demo` as the built-in model; anything else from the Hugging Face Hub."""
    if model in DEMO_MODEL_NAMES:
        path = demo_model_dir()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the built-in demo model is not installed at {path}")
        return path
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory: it has no config.json")
        return path
    if path.exists() or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model directory {model} does not exist")
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # any failure of the download is reported the same way
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelLoadError(
            f"cannot load model {repo_id!r}: it is not a local directory and downloading it from the "
            f"Hugging Face Hub failed ({type(exc).__name__}: {reason})"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def choose_dtype(requested: str, hf_config: dict[str, Any], device: torch.device) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32  # half precision matmuls are slow on CPUs without AVX-512 BF16
    stored = hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16"
    return _DTYPES.get(stored, torch.bfloat16)


def choose_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested} was asked for, but CUDA is not available")
    return device


def eos_token_ids(model_dir: Path, hf_config: dict[str, Any]) -> list[int]:
    generation = model_dir / "generation_config.json"
    source = read_json(generation) if generation.is_file() else {}
    value = source.get("eos_token_id", hf_config.get("eos_token_id"))
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def load_model(config: ModelConfig) -> LoadedModel:
    model_dir = resolve_model_dir(config.model, config.revision)
    hf_config = read_json(model_dir / "config.json")
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, hf_config, device)
    max_positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or 2048
    max_model_len = config.max_model_len or max_positions
    if max_model_len > max_positions:
        raise ModelLoadError(
            f"max_model_len {max_model_len} is longer than the model's {max_positions} positions"
        )
    try:
        cls = model_class(hf_config)
        with torch.device("meta"):
            model = cls(hf_config, max_model_len)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"cannot build the model from {model_dir / 'config.json'}: {exc}") from None
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # materialising the meta tensors gave each use its own parameter
    _reset_buffers(model)
    method, integers = _load_weights(model, model_dir, hf_config, config)
    model.eval()
    unquantized_bytes = weight_bytes(model)
    if method != "none":
        try:
            quantize_model(model, method, config.quantization_group_size, dtype, integers)
        except ValueError as exc:
            raise ModelLoadError(f"cannot quantize {model_dir} to {method}: {exc}") from None
    quantized_bytes = weight_bytes(model)
    if choose_linear_backend(config.linear_backend, device, dtype) == "onednn":
        pack_linears(model)  # the layers left in float (the output head at least)
    return LoadedModel(model, model_dir, hf_config, dtype, device, max_model_len, eos_token_ids(model_dir, hf_config),
                       method, quantized_bytes, unquantized_bytes)


def _load_weights(model: Any, model_dir: Path, hf_config: dict[str, Any],
                  config: ModelConfig) -> tuple[str, dict[str, Int4Weights] | None]:
    """Loads the checkpoint into the float model; returns the quantization to apply and, for a
    GPTQ/AWQ checkpoint run as such, its integers by checkpoint layer name."""
    try:
        checkpoint = read_checkpoint_quantization(model_dir, hf_config)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load {model_dir}: {exc}") from None
    method = resolve_quantization(config.quantization, checkpoint, model_dir)
    if checkpoint is not None and not hasattr(type(model), "FUSED"):
        raise ModelLoadError(f"cannot load {model_dir}: {checkpoint.method} checkpoints load for the Llama, "
                             "Mistral and Qwen families only")
    integers: dict[str, Int4Weights] = {}
    weights = iter_safetensors(safetensors_files(model_dir))
    try:
        if checkpoint is not None:
            weights = dequantizing_weights(weights, checkpoint, integers)
        model.load_weights(weights)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load weights of {model_dir}: {exc}") from None
    return method, integers if checkpoint is not None and method == checkpoint.method else None


def resolve_quantization(requested: str, checkpoint: CheckpointQuantization | None, model_dir: Path) -> str:
    """The quantization to run: none, int8, int4, gptq or awq (auto: the checkpoint's own)."""
    if checkpoint is None:
        if requested in ("gptq", "awq"):
            raise ModelLoadError(f"quantization {requested} needs a checkpoint quantized with {requested}, and {model_dir} "
                                 "has no quantization_config: use int8 or int4 to quantize its float weights at load")
        return "none" if requested == "auto" else requested
    if requested in ("auto", checkpoint.method, "none"):
        return checkpoint.method if requested == "auto" else requested
    raise ModelLoadError(f"{model_dir} is a {checkpoint.method} checkpoint: use quantization auto or "
                         f"{checkpoint.method}, or none to run its weights dequantized to dtype (not {requested})")


def _reset_buffers(model: torch.nn.Module) -> None:
    """Recomputes the non-persistent buffers (rotary tables) that building on `meta` left empty."""
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
