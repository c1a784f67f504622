"""salr-edge: sparse + low-rank compression of LLMs for edge devices.

Public API::

    import salr_edge
    cfg = salr_edge.SALRConfig(sparsity=0.5, rank=64, target_modules="all-linear")
    salr_edge.compress_(model, cfg)                 # in place
    salr_edge.save_compressed(model, "out/")
    model = salr_edge.load_compressed("out/")

Heavy dependencies (transformers, onnxruntime, triton) load lazily, so `import salr_edge` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SALRConfig": "salr_edge.config",
    "SALAADConfig": "salr_edge.config",
    "compress_": "salr_edge.api",
    "unload": "salr_edge.api",
    "register_handler": "salr_edge.api",
    "save_compressed": "salr_edge.checkpoint",
    "load_compressed": "salr_edge.checkpoint",
    "SparseLowRankLinear": "salr_edge.modules.sparse_lowrank_linear",
    "BitmapTensor": "salr_edge.formats.bitmap",
    "bitmap_encode": "salr_edge.formats.bitmap",
    "bitmap_decode": "salr_edge.formats.bitmap",
    "quantize_bitmap": "salr_edge.formats.bitmap",
    "load_model": "salr_edge.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'salr_edge' has no attribute {name!r}")
