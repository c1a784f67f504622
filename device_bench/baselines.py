"""The baselines every measurement is compared against, built from the same source model and cached.

- dense fp32: the source model exported by the same exporter without compression;
- int4: ONNX Runtime's own weight-only quantization of that export (`MatMulNBits`, block 32,
  symmetric, `accuracy_level=4`), what an edge user would otherwise pick.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ..io_utils import atomic_directory
from ..models import DEFAULT_MODEL_NAME, cache_dir, resolve_model_dir

logger = logging.getLogger(__name__)

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4


def _source_key(source: str | None) -> str:
    if source is None:
        return DEFAULT_MODEL_NAME
    path = resolve_model_dir(source).resolve()
    stamp = f"{path}:{(path / 'config.json').stat().st_mtime_ns}"
    return f"{path.name}-{hashlib.sha1(stamp.encode()).hexdigest()[:10]}"


def baseline_dir(source: str | None) -> Path:
    return cache_dir() / "bench" / _source_key(source)


def _variant(name: str) -> str:
    """Cache folder of a baseline: named after the exporter's default opset and graph revision, so a change of
    either rebuilds it."""
    from ..export.exporter import DEFAULT_OPSET, GRAPH_REVISION

    return f"{name}_opset{DEFAULT_OPSET}_r{GRAPH_REVISION}"


def dense_baseline(source: str | None, refresh: bool = False) -> Path:
    """The dense fp32 export of `source` (None: the default model), built once and cached."""
    from ..export.exporter import ExportConfig, export_onnx
    from ..models import load_model

    target = baseline_dir(source) / _variant("dense_fp32")
    model_path = target / "model.onnx"
    if model_path.is_file() and not refresh:
        return model_path
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the dense fp32 baseline in %s", target)
    model, tokenizer = load_model(source)
    with atomic_directory(target) as tmp:
        export_onnx(model, tmp / "model.onnx", ExportConfig(method="dense", dtype="fp32", genai_config=False,
                                                            copy_library=False), tokenizer=tokenizer)
    return model_path


def int4_baseline(source: str | None, refresh: bool = False) -> Path:
    """ORT's int4 `MatMulNBits` quantization of the dense fp32 baseline, built once and cached."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    target = baseline_dir(source) / _variant("int4_matmulnbits")
    model_path = target / "model.onnx"
    if model_path.is_file() and not refresh:
        return model_path
    dense = dense_baseline(source, refresh)
    logger.info("quantizing %s to int4 MatMulNBits (block %d, accuracy_level %d)", dense, INT4_BLOCK_SIZE,
                INT4_ACCURACY_LEVEL)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(dense)), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=INT4_ACCURACY_LEVEL)
    quantizer.process()
    with atomic_directory(target) as tmp:
        quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=True)
    return model_path


def ensure_baselines(source: str | None, refresh: bool = False) -> list[tuple[str, Path]]:
    """[(name, path)] of the dense fp32 and int4 baselines of `source`."""
    return [("dense-fp32", dense_baseline(source, refresh)), ("int4-matmulnbits", int4_baseline(source, refresh))]


def default_name(path: str | os.PathLike) -> str:
    """A short display name for a model file: its folder name, else its stem."""
    path = Path(path)
    return path.parent.name if path.stem == "model" else path.stem
