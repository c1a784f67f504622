"""NumPy references of the com.salr ops, as `onnx.reference` OpRun classes, plus a tiny bitmap encoder.

The encoder is deliberately independent of `salr_edge.formats` (the tests of the C++ library must not move
when the Python package changes): it restates the format of DESIGN.md section 2.

- `bitmap`: uint8 [N, ceil(K/8)]; bit j (least significant first) of byte g in row n <-> W[n, 8g + j];
  padding bits past K are 0.
- `values`: the kept entries, row by row, columns ascending.
- `row_offsets`: int64 [N + 1]; row n's values are values[row_offsets[n]:row_offsets[n + 1]].

The op references compute in float64 and round once to the output type, so they are the exact answer the
kernels approximate; the tests' tolerance table says how far an fp32-accumulating kernel may be from it.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

SALR_DOMAIN = "com.salr"
OPSET_VERSION = 1
BITMAP_DECODE = "BitmapDecode"
FUSED_ADAPTER_GEMM = "FusedAdapterGemm"
SALR_LINEAR = "SALRLinear"
IN_FEATURES_ATTR = "in_features"


def encode_bitmap(dense: np.ndarray, mask: np.ndarray | None = None, values_dtype=np.float16):
    """Encode W [N, K] (entries where `mask` is True; default: non-zero entries) into the bitmap format.

    Returns:
        (bitmap uint8 [N, ceil(K/8)], values [nnz] of `values_dtype`, row_offsets int64 [N + 1]).
    """
    dense = np.asarray(dense)
    if dense.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {dense.shape}")
    if mask is None:
        mask = dense != 0
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != dense.shape:
        raise ValueError(f"mask shape {mask.shape} != weight shape {dense.shape}")
    n, k = dense.shape
    width = (k + 7) // 8
    padded = np.zeros((n, width * 8), dtype=bool)
    padded[:, :k] = mask
    bitmap = np.packbits(padded, axis=1, bitorder="little")
    values = dense[mask].astype(values_dtype)  # row-major boolean indexing: rows in order, columns ascending
    row_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=row_offsets[1:])
    return bitmap.reshape(n, width), values, row_offsets


def decode_bitmap(bitmap: np.ndarray, values: np.ndarray, row_offsets: np.ndarray, in_features: int) -> np.ndarray:
    """Dense W [N, K] in the values' dtype. Assumes a well-formed encoding (no checks: see the C++ kernels)."""
    n = bitmap.shape[0]
    bits = np.unpackbits(np.asarray(bitmap, dtype=np.uint8), axis=1, bitorder="little")
    mask = bits[:, :in_features].astype(bool)
    dense = np.zeros((n, in_features), dtype=values.dtype)
    dense[mask] = values[: int(row_offsets[-1])] if n else values[:0]
    return dense


class BitmapDecode(OpRun):
    op_domain = SALR_DOMAIN

    def _run(self, bitmap, values, row_offsets, in_features=None):
        return (decode_bitmap(bitmap, values, row_offsets, int(in_features)),)


class FusedAdapterGemm(OpRun):
    op_domain = SALR_DOMAIN

    def _run(self, X, A_cat, B_cat):
        t = X.astype(np.float64) @ A_cat.astype(np.float64).T  # (..., R)
        y = t @ B_cat.astype(np.float64).T  # (..., N)
        return (y.astype(X.dtype),)


class SALRLinear(OpRun):
    op_domain = SALR_DOMAIN

    def _run(self, X, bitmap, values, row_offsets, A_cat, B_cat, bias=None, in_features=None):
        w = decode_bitmap(bitmap, values, row_offsets, int(in_features)).astype(np.float64)  # (N, K)
        x = X.astype(np.float64)  # (..., K)
        y = x @ w.T + (x @ A_cat.astype(np.float64).T) @ B_cat.astype(np.float64).T  # (..., N)
        if bias is not None:
            y = y + bias.astype(np.float64)
        return (y.astype(X.dtype),)


REFERENCE_OPS = [BitmapDecode, FusedAdapterGemm, SALRLinear]
