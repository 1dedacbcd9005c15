"""Reading safetensors checkpoints and copying their tensors into a model's parameters."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lmserve.engine.models.layers import FusedLinear

# Checkpoint name -> (parameter name, shard of a FusedLinear or None), or None to skip the tensor.
Rename = Callable[[str], "tuple[str, int | None] | None"]


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files: the shards named by the index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"unreadable weights index {index}: {exc}") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if not path.is_file():
            raise ValueError(f"weights file {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ValueError(f"corrupt or unreadable weights file {path}: {exc}") from None


def load_checkpoint_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], rename: Rename) -> None:
    """Copies every checkpoint tensor into its parameter (casting dtype) and checks nothing is missing."""
    params = dict(model.named_parameters())
    expected: set[tuple[str, int | None]] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}" if module_name else attr
            if name not in params or params[name] is not param:
                continue  # a tied parameter, loaded under its first name
            if isinstance(module, FusedLinear):
                expected.update((name, shard) for shard in range(len(module.shard_sizes)))
            else:
                expected.add((name, None))
    loaded: set[tuple[str, int | None]] = set()
    with torch.no_grad():
        for ckpt_name, tensor in weights:
            target = rename(ckpt_name)
            if target is None:
                continue
            name, shard = target
            if name not in params:
                raise ValueError(f"checkpoint tensor {ckpt_name!r} does not belong to this architecture")
            if shard is None:
                param = params[name]
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(param.shape)}"
                    )
                param.copy_(tensor)
            else:
                module_name, _, attr = name.rpartition(".")
                fused = model.get_submodule(module_name)
                if not isinstance(fused, FusedLinear):
                    raise ValueError(f"{module_name} is not a fused projection")
                fused.load_shard(shard, attr, tensor.to(fused.weight.dtype))
            loaded.add((name, shard))
    missing = sorted(f"{name}" + (f"[{shard}]" if shard is not None else "") for name, shard in expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {shown}")
