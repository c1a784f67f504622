"""`save_compressed` / `load_compressed`: checkpoints shaped like `save_pretrained`.

A checkpoint directory holds:
- ``config.json``: the transformers config of the base model;
- ``salr_config.json``: our own block (format name and version, library version, method and its
  config, per-layer shape/density/adapters, and ``bits``/``group_size`` of quantized layers), written
  with ``sort_keys=True``. The format is "salr-bitmap-v2" (version 2) when any layer stores quantized
  values, else "salr-bitmap-v1" (version 1), so float checkpoints stay readable by older versions;
- ``model.safetensors``: for every compressed layer ``<name>.weight.{bitmap,values,row_offsets,shape}``
  (+ ``<name>.weight.scales`` when quantized), ``<name>.salr_A.<adapter>``, ``<name>.salr_B.<adapter>``,
  ``<name>.bias``; every other parameter and persistent buffer under its usual name (tied duplicates
  stored once). Nothing is pickled.
- tokenizer files when a tokenizer is given.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .api import replace_module
from .formats.bitmap import FORMAT_NAMES, FORMAT_VERSION, FORMAT_VERSION_V2, BitmapFormatError, BitmapTensor, validate
from .io_utils import atomic_directory
from .modules.sparse_lowrank_linear import SparseLowRankLinear, iter_sparse_lowrank

logger = logging.getLogger(__name__)

SALR_CONFIG_NAME = "salr_config.json"
WEIGHTS_NAME = "model.safetensors"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of an unknown version or inconsistent with its config."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_tensors(model: nn.Module, values_dtype: torch.dtype | None = None,
                       adapter_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the per-layer metadata that `save_compressed` writes (`values_dtype`: float bases only)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    skip: set[str] = set()
    for name, module in iter_sparse_lowrank(model):
        bitmap = module.to_bitmap(values_dtype)
        tensors[f"{name}.weight.bitmap"] = bitmap.bitmap
        tensors[f"{name}.weight.values"] = bitmap.values
        tensors[f"{name}.weight.row_offsets"] = bitmap.row_offsets
        tensors[f"{name}.weight.shape"] = torch.tensor(bitmap.shape, dtype=torch.int64)
        if bitmap.is_quantized:
            tensors[f"{name}.weight.scales"] = bitmap.scales
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach()
        adapters = []  # a list: the concatenation order of A_cat/B_cat must survive sort_keys
        for adapter in module.adapter_names:
            a, b = module.salr_A[adapter], module.salr_B[adapter]
            tensors[f"{name}.salr_A.{adapter}"] = a.detach().to(adapter_dtype or a.dtype)
            tensors[f"{name}.salr_B.{adapter}"] = b.detach().to(adapter_dtype or b.dtype)
            adapters.append({"name": adapter, "rank": int(a.shape[0]), "scaling": module.salr_scaling[adapter],
                             "trainable": bool(a.requires_grad)})
        layers[name] = {"shape": list(bitmap.shape), "density": bitmap.density, "adapters": adapters}
        if bitmap.is_quantized:
            layers[name].update(bits=bitmap.bits, group_size=bitmap.group_size)
        skip.update(f"{name}.{p}" for p, _ in module.named_parameters())
        skip.update(f"{name}.{b}" for b, _ in module.named_buffers())
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if key in skip:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach()
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, {"layers": layers, "tied": tied}


def save_compressed(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                    values_dtype: torch.dtype | None = None, adapter_dtype: torch.dtype | None = None) -> Path:
    """Write a compressed model as `config.json` + `salr_config.json` + `model.safetensors`, atomically.

    Args:
        model: a model holding `SparseLowRankLinear` layers (from `compress_` or `load_compressed`).
        values_dtype: dtype of the stored float non-zeros (default: the weights' dtype; float16 halves
            them); quantized layers keep their integers and scales.
        adapter_dtype: dtype of the stored adapters (default: theirs).

    Returns:
        The checkpoint directory.
    """
    from safetensors.torch import save_file

    if not any(True for _ in iter_sparse_lowrank(model)):
        raise ValueError("the model has no SparseLowRankLinear layers: compress it first (salr_edge.compress_)")
    if any(m.merged for _, m in iter_sparse_lowrank(model)):
        raise ValueError("adapters are merged into the base weights; call unmerge() before saving")
    tensors, meta = checkpoint_tensors(model, values_dtype, adapter_dtype)
    metadata = getattr(model, "salr_metadata", {"method": "salr", "config": None})
    quantized = any("bits" in layer for layer in meta["layers"].values())
    version = FORMAT_VERSION_V2 if quantized else FORMAT_VERSION
    float_values = [tensors[f"{n}.weight.values"] for n, layer in meta["layers"].items() if "bits" not in layer]
    salr_config = {
        "format": FORMAT_NAMES[version],
        "format_version": version,
        "library_version": __version__,
        "method": metadata.get("method", "salr"),
        "config": metadata.get("config"),
        "bit_order": "little",
        # dtype of the float (version-1) values; None when every layer is quantized
        "values_dtype": _dtype_name(float_values[0].dtype) if float_values else None,
        "torch_dtype": _dtype_name(next(model.parameters()).dtype),
        **meta,
    }
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        model.config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "salr_format": FORMAT_NAMES[version]})
        (tmp / SALR_CONFIG_NAME).write_text(json.dumps(salr_config, sort_keys=True, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved compressed model to %s", directory)
    return directory


def read_salr_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check `salr_config.json` (existence, format name, supported version)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    path = directory / SALR_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a salr-edge checkpoint (no {SALR_CONFIG_NAME})")
    return read_versioned_json(path, tuple(FORMAT_NAMES.values()), FORMAT_VERSION_V2)


def read_versioned_json(path: Path, format_name: str | tuple[str, ...], max_version: int) -> dict[str, Any]:
    """Parse a metadata JSON file and check its `format` name (or one of several) and that its
    `format_version` is not newer than `max_version`."""
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    names = (format_name,) if isinstance(format_name, str) else format_name
    if cfg.get("format") not in names:
        expected = " or ".join(repr(n) for n in names)
        raise CheckpointError(f"{path}: format {cfg.get('format')!r} is not {expected}")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise CheckpointError(f"{path}: format version {version} is newer than this library supports "
                              f"(version {max_version}); upgrade salr-edge")
    return cfg


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc


def _take(tensors: dict[str, torch.Tensor], key: str, directory: Path) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"checkpoint {directory} is missing tensor {key!r} named in {SALR_CONFIG_NAME}")
    return tensors.pop(key)


def load_compressed(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint written by `save_compressed` into a transformers model with `SparseLowRankLinear` layers.

    Args:
        dtype: dtype of the model's parameters (default: the dtype it was saved from).

    Raises:
        FileNotFoundError, CheckpointError: a missing, corrupt, newer or inconsistent checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import check_supported

    directory = Path(directory)
    salr_config = read_salr_config(directory)
    dtype = dtype or _DTYPES.get(salr_config.get("torch_dtype", "float32"), torch.float32)
    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory}: cannot read config.json: {exc}") from exc
    check_supported(hf_config)
    tensors = _load_tensors(directory)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for name, layer in salr_config.get("layers", {}).items():
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"checkpoint layer {name!r} does not exist in a {hf_config.model_type} model") from exc
        shape = tuple(int(s) for s in _take(tensors, f"{name}.weight.shape", directory).tolist())
        bits = layer.get("bits")
        if bits is not None and salr_config["format_version"] < FORMAT_VERSION_V2:
            raise CheckpointError(f"checkpoint layer {name!r} has quantized values (bits={bits}) but the checkpoint "
                                  f"says format version {salr_config['format_version']}, which has none")
        scales = _take(tensors, f"{name}.weight.scales", directory) if bits is not None else None
        bitmap = BitmapTensor(_take(tensors, f"{name}.weight.bitmap", directory),
                              _take(tensors, f"{name}.weight.values", directory),
                              _take(tensors, f"{name}.weight.row_offsets", directory), shape,
                              scales, bits, layer.get("group_size") if bits is not None else None)
        try:
            validate(bitmap)
        except BitmapFormatError as exc:
            raise CheckpointError(f"checkpoint layer {name!r}: {exc}") from exc
        bias = tensors.pop(f"{name}.bias", None)
        module = SparseLowRankLinear.from_bitmap(bitmap, bias, dtype=dtype)
        for info in layer.get("adapters", []):
            adapter = info["name"]
            a = _take(tensors, f"{name}.salr_A.{adapter}", directory).to(dtype)
            b = _take(tensors, f"{name}.salr_B.{adapter}", directory).to(dtype)
            module.add_adapter(adapter, a, b, scaling=info["scaling"], trainable=info.get("trainable", True))
        replace_module(model, name, module)
    for alias, source in salr_config.get("tied", {}).items():
        if source in tensors:
            tensors[alias] = tensors[source]
    expected = {k for k in model.state_dict() if ".salr_A." not in k and ".salr_B." not in k
                and not any(k.startswith(f"{n}.") for n in salr_config.get("layers", {}))}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict(tensors, strict=False)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in iter_sparse_lowrank(model):
        for info in salr_config["layers"][name].get("adapters", []):
            module.set_adapter_trainable(info["name"], info.get("trainable", True))
    model.salr_metadata = {"method": salr_config.get("method", "salr"), "config": salr_config.get("config")}
    model.eval()
    return model
