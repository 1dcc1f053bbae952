"""Diffusers-layout checkpoints: one folder per component with `config.json` and safetensors weights.

A component folder holds either one `diffusion_pytorch_model.safetensors` (any single `*.safetensors`) or shards
listed by a `*.safetensors.index.json`. Loading checks every key and shape against the module before reading any
weight, so a wrong checkpoint fails with one message listing everything that is off. Modules are built on the meta
device and the tensors are assigned as they are read, so a large model never exists twice in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as asked; the message names the file and the problem."""


def component_dir(path: str | os.PathLike, component: str) -> Path:
    """The folder of `component` (e.g. "transformer") given a pipeline folder or the component folder itself."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint folder")
    for candidate in (root / component, root):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{root}: neither {root / component / 'config.json'} nor {root / 'config.json'} exists")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, thousands of digits, deep nesting
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200] or type(e).__name__})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a config is a JSON object of fields, got {type(config).__name__}")
    return config


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (reads headers only)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index_path = indexes[0]
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{folder}: only pickle weights ({', '.join(pickles)}); streamgen loads safetensors only, because "
                    "unpickling runs arbitrary code. Convert them with safetensors.torch.save_file first."
                )
            raise CheckpointError(f"{folder}: no *.safetensors weights")
        if len(shards) > 1:
            raise CheckpointError(f"{folder}: several safetensors files ({', '.join(shards)}) but no index file")
        weight_map = None

    located: dict[str, Path] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(f"{path}: shard named by the index is missing")
        for key in _keys_of(path):
            if key in located:
                raise CheckpointError(f"{path}: tensor {key!r} also stored in {located[key].name}")
            located[key] = path
    if weight_map is not None:
        actual = {k: p.name for k, p in located.items()}
        disagree = sorted(k for k in set(weight_map) | set(actual) if weight_map.get(k) != actual.get(k))
        if disagree:
            raise CheckpointError(f"{indexes[0]}: index disagrees with the shards for {_short_list(disagree)}")
    return located


def _keys_of(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def _short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_weights(
    module: nn.Module,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    fp32_modules: Iterable[str] = (),
) -> nn.Module:
    """Fill `module` (typically built on the meta device) from `folder`, strictly.

    Every parameter and persistent buffer must be present with the module's shape; extra tensors are errors too.
    Tensors under a name containing one of `fp32_modules` as a path component stay float32 whatever `dtype` is.
    """
    located = weight_files(folder)
    expected = module.state_dict(keep_vars=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, path in located.items():
        with safe_open(path, framework="pt") as f:
            shapes[key] = tuple(f.get_slice(key).get_shape())
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {list(shapes[k])} vs model {list(expected[k].shape)}"
        for k in set(shapes) & set(expected)
        if tuple(expected[k].shape) != shapes[k]
    )
    if missing or unexpected or misshaped:
        lines = [f"{folder}: checkpoint does not match the model built from its config.json"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_short_list(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        if misshaped:
            lines.append(f"  wrong shapes ({len(misshaped)}): {_short_list(misshaped, 6)}")
        raise CheckpointError("\n".join(lines))

    fp32_parts = tuple(fp32_modules)
    by_file: dict[Path, list[str]] = {}
    for key, path in located.items():
        by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        state = {}
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for key in keys:
                    keep_fp32 = any(part in key.split(".") for part in fp32_parts)
                    state[key] = f.get_tensor(key).to(torch.float32 if keep_fp32 else dtype)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: failed reading tensors ({e})") from None
        module.load_state_dict(state, strict=False, assign=True)
    return module


def save_weights(module: nn.Module, folder: Path, config: dict, max_shard_bytes: int | None = None) -> None:
    """Write `config.json` and the module's weights in the layout `load_weights` reads, atomically per file."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for stale in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        _atomic(folder / WEIGHTS_NAME, lambda p: save_file(shards[0], str(p), metadata={"format": "pt"}))
    else:
        stem = WEIGHTS_NAME.removesuffix(".safetensors")
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic(folder / name, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic(folder / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=2)))
    _atomic(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
