"""SALR orchestration: choose layers, prune the frozen base, add the SVD residual and LoRA adapters."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import register_handler, replace_module
from ..config import SALRConfig
from ..modules.sparse_lowrank_linear import SparseLowRankLinear
from ..targeting import find_target_linears
from .calibration import input_feature_norms
from .masks import magnitude_scores, select_mask, wanda_scores
from .svd import truncated_svd

logger = logging.getLogger(__name__)

RESIDUAL_ADAPTER = "residual"
LORA_ADAPTER = "lora"


def compress_linear(linear: nn.Linear, config: SALRConfig, input_norms: torch.Tensor | None = None) -> SparseLowRankLinear:
    """Prune one layer, quantize the kept values if asked, and attach its adapters (no model needed).

    The SVD residual adapter approximates W − base, where base is what the module computes with:
    prune(W), or dequant(Q(prune(W))) for integer values, so the adapter absorbs the quantization error
    together with the pruning error.
    """
    weight = linear.weight.detach()
    n, k = weight.shape
    for field in ("rank", "lora_rank"):
        r = getattr(config, field)
        if r > min(n, k):
            raise ValueError(f"{field}={r} exceeds min(d, k)={min(n, k)} of a {n}x{k} layer")
    if config.pruning == "wanda" and input_norms is None:
        raise ValueError("pruning='wanda' needs the layer's input feature norms (calibration data)")
    scores = wanda_scores(weight, input_norms) if config.pruning == "wanda" else magnitude_scores(weight)
    mask = select_mask(scores, config.sparsity, config.granularity)
    dense = weight.float().clone() if config.rank else None  # the module masks `weight` in place
    module = SparseLowRankLinear(linear, mask)
    if config.bits is not None:
        module.quantize_base_(config.bits, config.group_size)
    if config.rank:
        residual = dense.sub_(module.sparse_weight().float())  # what pruning (and quantization) removed
        a, b = truncated_svd(residual, config.rank, config.svd_method, config.svd_niter)
        module.add_adapter(RESIDUAL_ADAPTER, a, b, scaling=1.0, trainable=config.train_residual)
    if config.lora_rank:
        module.add_lora(LORA_ADAPTER, config.lora_rank, config.lora_alpha)
    return module


@register_handler(SALRConfig)
def compress_salr_(model: nn.Module, config: SALRConfig, calib_data: Iterable[torch.Tensor] | None = None,
                   show_progress: bool = True, input_norms: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Modifies `model` in place with SALR (see `SALRConfig`); everything but the adapters is frozen.

    Args:
        calib_data: input-id batches for Wanda's activation norms.
        input_norms: precomputed Wanda norms (name -> [in_features]), to reuse one calibration pass.
    """
    names = find_target_linears(model, config.target_modules, config.exclude_modules)
    norms: dict[str, torch.Tensor] = dict(input_norms or {})
    if config.pruning == "wanda" and not all(n in norms for n in names):
        if calib_data is None:
            raise ValueError("pruning='wanda' needs calib_data (input ids of calibration text)")
        norms = input_feature_norms(model, names, calib_data, show_progress)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in tqdm(names, desc="SALR compress", disable=not show_progress):
        module = compress_linear(model.get_submodule(name), config, norms.get(name))
        replace_module(model, name, module)
    model.salr_metadata = {"method": "salr", "config": config.to_dict()}
    logger.info("SALR compressed %d layers (sparsity %.2f, rank %d, lora_rank %d, values %s)",
                len(names), config.sparsity, config.rank, config.lora_rank, config.values)
    return model
