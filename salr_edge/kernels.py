"""Triton kernels of the com.salr ops, reached lazily so that `import salr_edge` never imports triton.

Public entry points (each imports `salr_edge.triton`, and with it triton, on first use):

- `salr_linear_forward(x, bitmap, values, row_offsets, a_cat, b_cat, bias=None, *, group_offsets=None)`
- `fused_adapter_gemm_forward(x, a_cat, b_cat)`
- `bitmap_decode_forward(bitmap, values, row_offsets, in_features, *, dtype=None, group_offsets=None)`
- `build_group_offsets(bitmap, row_offsets, nnz, in_features)`, `encode_on_device(weight, mask)`

`sparse_lowrank_forward(module, x)` is the backend switch `SparseLowRankLinear.forward` calls for CUDA
inputs: it returns the Triton result, or None when the torch path must run instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import weakref
from dataclasses import dataclass
from typing import Any

_EXPORTS = ("salr_linear_forward", "fused_adapter_gemm_forward", "bitmap_decode_forward", "build_group_offsets",
            "encode_on_device", "get_autotune_config", "get_gemv_autotune_config", "get_dense_autotune_config")

__all__ = [*_EXPORTS, "triton_available", "sparse_lowrank_forward"]

_AVAILABLE: bool | None = None


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module("salr_edge.triton"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'salr_edge.kernels' has no attribute {name!r}")


def triton_available() -> bool:
    """Whether triton and the kernels package import (cached after the first call)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        if importlib.util.find_spec("triton") is None:
            _AVAILABLE = False
        else:
            try:
                importlib.import_module("salr_edge.triton")
                _AVAILABLE = True
            except ImportError:  # e.g. a triton too old for the kernels: the torch path still works
                _AVAILABLE = False
    return _AVAILABLE


@dataclass
class _PreparedBase:
    """A module's sparse base in the bitmap format on its device, with the key that says when it is stale."""

    key: tuple
    bitmap: Any
    values: Any
    row_offsets: Any
    group_offsets: Any


# Keyed weakly by module: the encoding lives as long as the module, and the lead's module class stays
# free of kernel state.
_PREPARED: "weakref.WeakKeyDictionary[Any, _PreparedBase]" = weakref.WeakKeyDictionary()


def _prepared_base(module) -> _PreparedBase:
    from salr_edge.triton import build_group_offsets, encode_on_device

    weight = module.base_layer.weight
    mask = module.salr_mask
    # In-place writes (merge/unmerge, a reload) bump _version, so a stale encoding is never reused.
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, mask.data_ptr(), mask._version)
    entry = _PREPARED.get(module)
    if entry is None or entry.key != key:
        bitmap, values, row_offsets = encode_on_device(weight.detach(), mask)
        group_offsets = build_group_offsets(bitmap, row_offsets, values.numel(), weight.shape[1])
        entry = _PreparedBase(key, bitmap, values, row_offsets, group_offsets)
        _PREPARED[module] = entry
    return entry


def sparse_lowrank_forward(module, x):
    """`SparseLowRankLinear.forward` through the Triton SALRLinear kernel, or None to use the torch path.

    The Triton path runs only when it computes exactly what the torch path would: adapters not merged,
    x on the weight's device with the weight's dtype, and no autograd graph to build (the kernel has no
    backward; training goes through the dense torch path, which needs the dense weight for dX anyway).
    """
    weight = module.base_layer.weight
    if module.merged or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    if x.device != weight.device or x.dtype != weight.dtype or not triton_available():
        return None
    import torch

    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return None
    from salr_edge.triton import salr_linear_forward

    base = _prepared_base(module)
    a_cat, b_cat = module.fused_adapters()  # (R, K), (N, R)
    return salr_linear_forward(x, base.bitmap, base.values, base.row_offsets, a_cat.to(x.dtype), b_cat.to(x.dtype),
                               module.base_layer.bias, group_offsets=base.group_offsets)
