"""ONNX export of (compressed) causal LMs: `com.salr` custom nodes with standard-ONNX function bodies.

Installed as `salr_edge.export`::

    from salr_edge.export import ExportConfig, export_onnx
    export_onnx(model, "out/model.onnx", ExportConfig(method="salr", dtype="fp32"), tokenizer=tokenizer)

Heavy imports (torch's exporter, onnx) happen only when these names are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ExportConfig": "salr_edge.export.exporter",
    "ExportResult": "salr_edge.export.exporter",
    "export_onnx": "salr_edge.export.exporter",
    "ARCHITECTURES": "salr_edge.export.architectures",
    "UnsupportedArchitectureError": "salr_edge.export.architectures",
    "SALR_DOMAIN": "salr_edge.export.ops_schema",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'salr_edge.export' has no attribute {name!r}")
