"""NumPy references of the com.salr ops, as `onnx.reference` OpRun classes, plus a tiny bitmap encoder.

The encoder is deliberately independent of `salr_edge.formats` (the tests of the C++ library must not move
when the Python package changes): it restates the format of DESIGN.md section 2.

- `bitmap`: uint8 [N, ceil(K/8)]; bit j (least significant first) of byte g in row n <-> W[n, 8g + j];
  padding bits past K are 0.
- `values`: the kept entries, row by row, columns ascending.
- `row_offsets`: int64 [N + 1]; row n's values are values[row_offsets[n]:row_offsets[n + 1]].

Format v2 (custom_ops/README.md, "Bitmap format v2"): `values` holds integer codes, int8 [nnz] (bits 8) or
uint8 [ceil(nnz/2)] (bits 4: value i is nibble i % 2 of byte i // 2, low nibble first, nibble u means
q = u - 8, an odd count leaves the last high nibble 0), and `scales` float16 [ceil(nnz/group_size)] gives
value i = q_i * scales[i // group_size]; `quantize_values` / `dequantize_values` restate it.

The op references compute in float64 and round once to the output type, so they are the exact answer the
kernels approximate; the tests' tolerance table says how far an fp32-accumulating kernel may be from it.
`salr_linear_q_int_path` restates the arithmetic of SALRLinearQ's integer CPU path instead (activations
quantized to int8 per block of 32 columns), for a tight check of that path.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

SALR_DOMAIN = "com.salr"
OPSET_VERSION = 1
BITMAP_DECODE = "BitmapDecode"
FUSED_ADAPTER_GEMM = "FusedAdapterGemm"
SALR_LINEAR = "SALRLinear"
SALR_LINEAR_Q = "SALRLinearQ"
IN_FEATURES_ATTR = "in_features"
BITS_ATTR = "bits"
GROUP_SIZE_ATTR = "group_size"

QMAX = {8: 127, 4: 7}  # the quantizer's symmetric range; bits 4 codes may also hold -8 (nibble 0)
ACTIVATION_BLOCK = 32  # columns per activation scale on SALRLinearQ's integer path


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


def _linear(X, w, A_cat, B_cat, bias):
    """X W^T + (X A_cat^T) B_cat^T (+ bias) in float64, rounded once to X's type."""
    x = X.astype(np.float64)  # (..., K)
    y = x @ w.T + (x @ A_cat.astype(np.float64).T) @ B_cat.astype(np.float64).T  # (..., N)
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.astype(X.dtype)


class SALRLinear(OpRun):
    op_domain = SALR_DOMAIN

    def _run(self, X, bitmap, values, row_offsets, A_cat, B_cat, bias=None, in_features=None):
        w = decode_bitmap(bitmap, values, row_offsets, int(in_features)).astype(np.float64)  # (N, K)
        return (_linear(X, w, A_cat, B_cat, bias),)


# ------------------------------------------------------------------------------------------ format v2


def quantize_values(values_f32, bits: int, group_size: int):
    """Symmetric round-to-nearest quantization of the kept values, one fp16 scale per `group_size` values.

    scale_g = fp16(max |v| over group g / qmax) with qmax 127 (bits 8) or 7 (bits 4); q = clip(rint(v /
    scale_g), -qmax, qmax) (0 where the scale is 0). Bits 4 codes are packed two per byte, low nibble first,
    nibble = q + 8; an odd count leaves the last byte's high nibble 0.

    Returns:
        (stored: int8 [nnz] or uint8 [ceil(nnz/2)], scales: float16 [ceil(nnz/group_size)]).
    """
    if bits not in QMAX:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    v = np.asarray(values_f32, dtype=np.float64).reshape(-1)
    nnz, qmax = v.shape[0], QMAX[bits]
    n_groups = -(-nnz // group_size)
    padded = np.zeros(n_groups * group_size)
    padded[:nnz] = np.abs(v)
    scales = (padded.reshape(n_groups, group_size).max(axis=1, initial=0.0) / qmax).astype(np.float16)
    if not np.all(np.isfinite(scales)):
        raise ValueError("a group's scale overflows float16")
    s = np.repeat(scales.astype(np.float64), group_size)[:nnz]
    q = np.zeros(nnz, dtype=np.int64)
    nz = s > 0
    q[nz] = np.clip(np.rint(v[nz] / s[nz]), -qmax, qmax)
    return pack_codes(q, bits), scales


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes [nnz] -> stored `values`: int8 [nnz], or uint8 [ceil(nnz/2)] nibbles (q + 8, low first)."""
    q = np.asarray(q, dtype=np.int64).reshape(-1)
    if bits == 8:
        if q.size and (q.min() < -128 or q.max() > 127):
            raise ValueError("int8 code out of range")
        return q.astype(np.int8)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError("int4 code out of range [-8, 7]")
    u = (q + 8).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))  # the unused high nibble of an odd count is 0 (not the code of q = 0)
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def unpack_codes(stored: np.ndarray, bits: int, nnz: int) -> np.ndarray:
    """Stored `values` -> the first `nnz` integer codes, int64."""
    stored = np.asarray(stored).reshape(-1)
    if bits == 8:
        return stored[:nnz].astype(np.int64)
    b = stored.astype(np.uint8)
    u = np.empty(2 * b.shape[0], dtype=np.int64)
    u[0::2] = b & 0x0F
    u[1::2] = b >> 4
    return u[:nnz] - 8


def dequantize_values(stored, scales, bits: int, group_size: int, nnz: int) -> np.ndarray:
    """Values [nnz] as float32: q_i * float(scales[i // group_size]) (exact: <= 8-bit code x 11-bit fp16)."""
    q = unpack_codes(stored, bits, nnz)
    # indexed, not np.repeat(scales, group_size): a valid group_size may be far larger than nnz (fuzzing)
    s = np.asarray(scales, dtype=np.float16).astype(np.float64).reshape(-1)[np.arange(nnz) // group_size]
    return (q * s).astype(np.float32)


def dequantized_weight(bitmap, values, row_offsets, scales, in_features, bits, group_size) -> np.ndarray:
    """Dense W [N, K], float64, of a format-v2 layer."""
    nnz = int(row_offsets[-1])
    v = dequantize_values(values, scales, int(bits), int(group_size), nnz)
    return decode_bitmap(bitmap, v, row_offsets, int(in_features)).astype(np.float64)  # (N, K)


class SALRLinearQ(OpRun):
    """Exact answer: the dequantized weight in float64, activations as they are (no activation rounding)."""

    op_domain = SALR_DOMAIN

    def _run(self, X, bitmap, values, row_offsets, scales, A_cat, B_cat, bias=None, in_features=None, bits=None,
             group_size=None):
        w = dequantized_weight(bitmap, values, row_offsets, scales, in_features, bits, group_size)
        return (_linear(X, w, A_cat, B_cat, bias),)


def quantize_activations(x: np.ndarray, block: int = ACTIVATION_BLOCK):
    """The integer path's activation quantization, per row and per block of `block` columns.

    In fp32: scale = max |x_block| / 127, q = round-half-even(x / scale) (clipped to [-127, 127]); an all-zero
    block has scale 0 and codes 0.

    Returns:
        (q int64 [M, K], scale float32 [M, K // block]) for x [M, K] (K a multiple of `block`).
    """
    x = np.asarray(x, dtype=np.float32)
    m, k = x.shape
    if k % block:
        raise ValueError(f"K = {k} is not a multiple of the activation block {block}")
    xb = x.reshape(m, k // block, block)
    scale = (np.abs(xb).max(axis=2, initial=np.float32(0)) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.where(scale[..., None] > 0, np.rint(xb / safe[..., None]), 0)  # fp32 division, ties to even
    return np.clip(q, -127, 127).astype(np.int64).reshape(m, k), scale


def salr_linear_q_int_path(X, bitmap, values, row_offsets, scales, A_cat, B_cat, bias=None, *, in_features, bits,
                           group_size):
    """SALRLinearQ as its integer CPU path computes it, in float64 after the integer steps; rounded to X's type.

    Activations are quantized per row and per block of 32 columns (`quantize_activations`); the weight
    term of row n is sum_b dot_int(q_x[block b], q_w[row n, block b]) * s_x[b] * s_w[n, b] with exact
    integer dot products, where s_w[n, b] is the one group scale of row n's values in block b (the path's
    preconditions: 2:4, K % 64 == 0, group_size % 32 == 0, (K/2) % group_size == 0, make every (row, block)
    lie in one group; a layer where it does not raises ValueError). The adapters and the bias use the
    unquantized activations. Defined for any number of rows M, though the kernel takes this path at M = 1.
    """
    k = int(in_features)
    x = np.asarray(X)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    qx, sx = quantize_activations(x2)
    nnz = int(row_offsets[-1])
    n = bitmap.shape[0]
    blocks = k // ACTIVATION_BLOCK
    qw = decode_bitmap(bitmap, unpack_codes(values, int(bits), nnz), row_offsets, k)  # int64 [N, K]
    group = np.full((n, k), -1, dtype=np.int64)
    group[np.unpackbits(bitmap, axis=1, bitorder="little")[:, :k].astype(bool)] = np.arange(nnz) // int(group_size)
    gb = group.reshape(n, blocks, ACTIVATION_BLOCK)
    g_hi, g_lo = gb.max(axis=2), np.where(gb >= 0, gb, np.iinfo(np.int64).max).min(axis=2)
    if np.any((g_hi >= 0) & (g_hi != g_lo)):
        raise ValueError("a (row, 32-column block) holds values of two scale groups: not an integer-path layer")
    sw = np.where(g_hi >= 0, np.asarray(scales, dtype=np.float16).astype(np.float64)[np.maximum(g_hi, 0)], 0.0)
    dots = np.einsum("mbc,nbc->mnb", qx.reshape(-1, blocks, ACTIVATION_BLOCK), qw.reshape(n, blocks,
                     ACTIVATION_BLOCK))  # exact int64
    y = np.einsum("mnb,mb,nb->mn", dots.astype(np.float64), sx.astype(np.float64), sw)
    xf = x2.astype(np.float64)
    y = y + (xf @ A_cat.astype(np.float64).T) @ B_cat.astype(np.float64).T
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.reshape(*lead, n).astype(x.dtype)


def activation_quantization_bound(X, w) -> np.ndarray:
    """Bound on |integer path - exact| of the weight term, [..., N]: sum_b s_x[b] / 2 * sum_{c in b} |W[n, c]|.

    Rounding x to q * s_x moves each activation by at most s_x / 2 (s_x = max |x_block| / 127), so the weight
    term moves by at most this; `w` is the dense weight [N, K] (`dequantized_weight`)."""
    x = np.asarray(X)
    k = w.shape[1]
    _, sx = quantize_activations(x.reshape(-1, k))
    half = np.repeat(sx.astype(np.float64) / 2, ACTIVATION_BLOCK, axis=1)  # [M, K]
    return (half @ np.abs(w).T).reshape(*x.shape[:-1], w.shape[0])


REFERENCE_OPS = [BitmapDecode, FusedAdapterGemm, SALRLinear, SALRLinearQ]
