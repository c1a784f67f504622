"""Calibration statistics gathered with forward hooks."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def input_feature_norms(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor],
                        show_progress: bool = True) -> dict[str, torch.Tensor]:
    """L2 norm over all calibration tokens of every input feature of the named linear layers.

    Args:
        batches: input-id tensors [B, T] (or [T]) run through `model`.

    Returns:
        name -> [in_features] float32 norms (Wanda's ||X_j||_2).
    """
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (tokens, K)
            sq = (x * x).sum(dim=0)
            sums[name] = sums[name] + sq if name in sums else sq
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
    seen = 0
    try:
        device = next(model.parameters()).device
        for ids in tqdm(batches, desc="calibration", disable=not show_progress):
            ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
            model(input_ids=ids.to(device))
            seen += 1
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise ValueError("calibration data is empty: Wanda needs at least one batch of input ids")
    return {name: sums[name].sqrt().cpu() for name in names}
