"""SALAAD's public entry points: train, checkpoint the ADMM state, and cut the result to any budget.

    from salr_edge.salaad import train_salaad, save_salaad_checkpoint, extract
    history, trainer = train_salaad(model, tokens, SALAADConfig(...), FinetuneConfig(...))
    save_salaad_checkpoint(model, trainer, "ckpt/", tokenizer)   # on every rank under torchrun
    small = extract("ckpt/", budget=0.4)                         # SparseLowRankLinear layers
    salr_edge.save_compressed(small, "out/")                     # the normal SALR format: exportable

A SALAAD checkpoint directory holds:
- the trained dense model as `save_pretrained` writes it (``config.json``, ``model.safetensors``, ...),
  so it also loads as a plain transformers model;
- ``salaad_config.json`` (sorted keys): format name and version, library version, the `SALAADConfig`,
  and per targeted matrix its shape, kind, targets and controller scalars (α, β, ρ, rounds, rank ratio,
  effective rank, density, ‖X − L − S‖, ...);
- ``salaad_state.safetensors``: per matrix ``<name>.L_U`` [d, r], ``<name>.L_s`` [r], ``<name>.L_Vh`` [r, k]
  (L = U·diag(s)·Vh, s descending), ``<name>.S`` [d, k] and ``<name>.Y`` [d, k], all float32;
- tokenizer files when a tokenizer is given.
Written atomically; nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .algorithms.salaad import (SCALAR_FIELDS, TENSOR_FIELDS, FITS, Budget, BudgetSpec, ExtractionPlan, MatrixState,
                                SALAADTrainer, extract_, layer_bytes, parse_budget, plan_extraction, train_salaad)
from .checkpoint import CheckpointError, read_versioned_json
from .config import SALAADConfig
from .io_utils import atomic_directory
from .training.finetune import _world

SALAAD_FORMAT = "salaad-state"
SALAAD_FORMAT_VERSION = 1
SALAAD_CONFIG_NAME = "salaad_config.json"
SALAAD_STATE_NAME = "salaad_state.safetensors"

__all__ = ["BudgetSpec", "ExtractionPlan", "MatrixState", "SALAADTrainer", "extract", "extract_", "layer_bytes",
           "load_salaad_checkpoint", "parse_budget", "plan_extraction", "save_salaad_checkpoint", "train_salaad"]


def save_salaad_checkpoint(model: nn.Module, trainer: SALAADTrainer, directory: str | os.PathLike, tokenizer=None,
                           extra: dict[str, Any] | None = None) -> Path:
    """Write the trained model and every matrix's ADMM state (see the module docstring), atomically.

    Under torchrun call it on every rank (the state is gathered to rank 0, which alone writes).

    Args:
        extra: more JSON-serializable entries for ``salaad_config.json`` (e.g. the training settings).
    """
    from safetensors.torch import save_file

    from .models import write_model_files

    states = trainer.gather_states()
    directory = Path(directory)
    if _world()[0] != 0:
        return directory
    tensors: dict[str, torch.Tensor] = {}
    matrices: dict[str, Any] = {}
    for name, state in states.items():
        if not state.has_tensors:
            raise ValueError(f"{name}: the SALAAD state is not initialized (train first)")
        tensors.update({f"{name}.{k}": v.detach().float().contiguous().cpu() for k, v in state.tensor_dict().items()})
        matrices[name] = {"index": state.index, "shape": list(state.shape), "kind": state.kind,
                          "target_rank_ratio": state.target_rank_ratio, "target_density": state.target_density,
                          **state.scalars()}
    meta = {"format": SALAAD_FORMAT, "format_version": SALAAD_FORMAT_VERSION, "library_version": __version__,
            "config": trainer.config.to_dict(), "matrices": matrices, **(extra or {})}
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp)
        save_file(tensors, str(tmp / SALAAD_STATE_NAME), metadata={"format": "pt", "salaad_format": SALAAD_FORMAT})
        (tmp / SALAAD_CONFIG_NAME).write_text(json.dumps(meta, sort_keys=True, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


def read_salaad_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``salaad_config.json`` (existence, format name, supported version)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    path = directory / SALAAD_CONFIG_NAME
    if not path.is_file():
        cut = (directory / "salr_config.json").is_file()
        hint = " (it is a compressed SALR checkpoint, already cut)" if cut else ""
        raise CheckpointError(f"{directory} holds no SALAAD state (no {SALAAD_CONFIG_NAME}){hint}; give a "
                              f"checkpoint written by `salr salaad train`")
    return read_versioned_json(path, SALAAD_FORMAT, SALAAD_FORMAT_VERSION)


def load_salaad_checkpoint(directory: str | os.PathLike, dtype: torch.dtype = torch.float32
                           ) -> tuple[nn.Module, dict[str, MatrixState], SALAADConfig]:
    """(trained dense model, per-matrix ADMM state, config) from a SALAAD checkpoint.

    Raises:
        FileNotFoundError, CheckpointError: a missing, corrupt, newer or inconsistent checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import check_supported

    directory = Path(directory)
    meta = read_salaad_config(directory)
    try:
        config = SALAADConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / SALAAD_CONFIG_NAME}: bad SALAAD config: {exc}") from exc
    try:
        check_supported(AutoConfig.from_pretrained(directory))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {directory}: cannot load the trained model: {exc}") from exc
    model.eval()
    try:
        tensors = load_file(str(directory / SALAAD_STATE_NAME))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / SALAAD_STATE_NAME} is missing or corrupt: {exc}") from exc
    states: dict[str, MatrixState] = {}
    for name, info in meta.get("matrices", {}).items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"checkpoint matrix {name!r} does not exist in the model") from exc
        shape = tuple(int(v) for v in info["shape"])
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != shape:
            raise CheckpointError(f"checkpoint matrix {name!r}: expected an nn.Linear of shape {shape}")
        state = MatrixState(name, int(info["index"]), shape, info["kind"], float(info["target_rank_ratio"]),
                            float(info["target_density"]))
        state.set_scalars({f: info[f] for f in SCALAR_FIELDS})
        missing = [f"{name}.{f}" for f in TENSOR_FIELDS if f"{name}.{f}" not in tensors]
        if missing:
            raise CheckpointError(f"checkpoint {directory} is missing tensors {missing}")
        try:
            state.set_tensors({f: tensors[f"{name}.{f}"] for f in TENSOR_FIELDS})
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {directory}: {exc}") from exc
        states[name] = state
    if not states:
        raise CheckpointError(f"checkpoint {directory} lists no SALAAD matrices")
    return model, states, config


def extract(checkpoint_dir: str | os.PathLike, budget: Budget | None = None, dtype: torch.dtype = torch.float32,
            round_fp16: bool = True, fit: str = "none") -> nn.Module:
    """A model with `SparseLowRankLinear` layers cut from a SALAAD checkpoint to `budget`.

    Args:
        budget: a fraction in (0, 1) of the dense fp16 bytes of the targeted layers, bytes (an int or a string
            such as "40MB"), or parameters ("20M params"); None keeps the trained structure. Bytes count the
            bitmap, fp16 values, int64 row offsets and fp16 adapters; the result lands within ±2%.
        round_fp16: round the kept values and adapters through fp16 (what an fp16 checkpoint stores).
        fit: "none" (L and S as trained), "refit" (their structure, values re-fit to the trained X by least
            squares) or "project" (the planned ranks and non-zeros, fitted to X by alternating projections);
            see `extract_`.

    Returns:
        The model (its `salr_metadata["config"]["extraction"]` holds the plan), ready for `save_compressed`.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    model, states, config = load_salaad_checkpoint(checkpoint_dir, dtype)
    model, _ = extract_(model, states, budget, config, round_fp16, fit)
    return model
