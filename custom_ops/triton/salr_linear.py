"""Triton kernels of the com.salr ops for the PyTorch path: SALRLinear, FusedAdapterGemm, BitmapDecode.

SALRLinear follows the two-stage design of the paper, per (BLOCK_M x BLOCK_N) output tile and K step:

    stage 1 (decode)   bitmap bytes [BLOCK_N, BLOCK_K/8] + packed values  ->  dense W tile [BLOCK_N, BLOCK_K]
                       value index of a kept column = row_offsets[n] + group_offsets[n, k0/64]   (tile start)
                                                      + popcount of the tile's bytes before its byte
                                                      + popcount of the bits below it in its byte
    stage 2 (MMA)      acc[BLOCK_M, BLOCK_N] += X tile [BLOCK_M, BLOCK_K] · W tileᵀ  (tl.dot, fp32 accumulation)

Tile starts come from the derived `group_offsets` table, not from a running sum, so no K step waits for
the previous one's popcounts. Pipelining over K: Triton's pipeliner (`num_stages` >= 2) streams the
activation tiles through a cp.async ring in shared memory, and the weight stream, a data-dependent
gather the pipeliner cannot turn into cp.async, is prefetched by hand in registers (values of tile t+1
and bitmap of tile t+2 are in flight while tile t is in the tensor cores). After the K loop the low-rank
term accumulates into the same registers: acc += H · B_catᵀ with H = X·A_catᵀ [M, R] computed by a
small dense kernel first, so the op writes Y once.

Batch-1 decoding (M <= 16) uses a split-K variant: a GEMM grid would give only N/BLOCK_N programs,
too few to stream a 4096x4096 weight at full bandwidth, so each program takes a slice of K and the
slices meet through fp32 atomics.

Layering: `_*_kernel` (@triton.jit) -> `*_forward` (checks shapes/dtypes, allocates, grid) -> callers
(`salr_edge.kernels`, `SparseLowRankLinear`). Nothing is compiled or launched at import.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .bitmap_index import GROUP_COLS, build_group_offsets

GEMV_MAX_M = 16  # at most this many activation rows take the split-K kernel
_GROUP_COLS = tl.constexpr(GROUP_COLS)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------- configs

def get_autotune_config() -> list[triton.Config]:
    """Configs of the tiled SALRLinear kernel (M > 16). BLOCK_K must be a multiple of 64 (GROUP_COLS)."""
    if _interpreting():
        # The interpreter executes every program in Python; benchmarking several configs would take minutes.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=2),
    ]


def get_gemv_autotune_config() -> list[triton.Config]:
    """Configs of the split-K SALRLinear kernel (M <= 16; BLOCK_M is fixed at 16, tl.dot's minimum)."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}, num_warps=4, num_stages=2)]
    configs = []
    for block_n, block_k, split_k, stages in [(64, 128, 1, 3), (64, 128, 2, 3), (64, 128, 4, 3), (32, 256, 2, 3),
                                              (128, 64, 2, 4), (64, 64, 4, 4), (32, 128, 8, 3), (128, 128, 1, 3)]:
        configs.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                                     num_warps=4, num_stages=stages))
    return configs


def get_dense_autotune_config() -> list[triton.Config]:
    """Configs of the dense X·Bᵀ kernel used for the adapters (N or K is the rank R, often 8..128)."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ]


# ------------------------------------------------------------------------------------------ jit helpers

@triton.jit
def _popcount8(b):
    """Set bits of each int32 element in 0..255 (SWAR: pairs, nibbles, byte)."""
    b = b - ((b >> 1) & 0x55)
    b = (b & 0x33) + ((b >> 2) & 0x33)
    return (b + (b >> 4)) & 0x0F


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc += a·b with fp32 accumulation.

    DOT_UPCAST is set only under TRITON_INTERPRET=1 for bfloat16: the interpreter's tl.dot reads bf16
    operands as garbage (triton 3.9). bf16·bf16 products are exact in fp32, so the upcast computes what
    the tensor cores compute, up to summation order.
    """
    if DOT_UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _load_tile_bits(bitmap_ptr, group_offsets_ptr, rn, n_mask, k0, k_end, W_BYTES, N_GROUPS,
                    BLOCK_K: tl.constexpr):
    """Bitmap bytes (BN, BLOCK_K/8) int32 and tile start (BN,) of the tile at column k0 (a multiple of 64).

    Rows past N, bytes past the row's end and every byte of a tile at or past `k_end` load as 0, so such a
    tile decodes to zeros without touching `values`.
    """
    BLOCK_KB: tl.constexpr = BLOCK_K // 8
    byte_idx = k0 // 8 + tl.arange(0, BLOCK_KB)  # (KB,)
    live = n_mask & ((rn * 0 + k0) < k_end)  # (BN,); a tensor compare, so k0 and k_end may be ints or scalars
    bytes_ = tl.load(bitmap_ptr + rn[:, None] * W_BYTES + byte_idx[None, :],
                     mask=live[:, None] & (byte_idx < W_BYTES)[None, :], other=0)
    tile_start = tl.load(group_offsets_ptr + rn * N_GROUPS + k0 // _GROUP_COLS, mask=live, other=0)  # (BN,)
    return bytes_.to(tl.int32), tile_start


@triton.jit
def _gather_tile(values_ptr, row_base, bytes_, tile_start, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Stage 1: the dense W tile [BLOCK_N, BLOCK_K] from its bitmap bytes, zeros where pruned.

    Value index of a kept column = row_offsets[n] + tile start + kept entries of the tile's earlier bytes
    + set bits below it in its byte. Padding bits past K are 0 by the format's invariant (checked before
    launch), so no column >= K reads `values`.
    """
    bit = tl.arange(0, 8)
    counts = _popcount8(bytes_)  # (BN, KB)
    before = tl.cumsum(counts, axis=1) - counts  # kept entries of the tile before each byte
    below = _popcount8(bytes_[:, :, None] & ((1 << bit) - 1)[None, None, :])  # (BN, KB, 8)
    kept = ((bytes_[:, :, None] >> bit[None, None, :]) & 1) != 0  # (BN, KB, 8)
    idx = (row_base + tile_start)[:, None, None] + (before[:, :, None] + below).to(tl.int64)  # (BN, KB, 8)
    w = tl.load(values_ptr + idx, mask=kept, other=0.0)  # (BN, KB, 8)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse_k_loop(acc, x_ptr, stride_xm, rm, m_mask, k_first, k_end, K,
                   bitmap_ptr, values_ptr, row_base, group_offsets_ptr, rn, n_mask, W_BYTES, N_GROUPS,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += X[rm, k_first:k_end] · W[rn, k_first:k_end]ᵀ, K tiles starting at k_first.

    The weight stream is prefetched by hand: while tile t is in the MMA, the values of tile t+1 and the
    bitmap of tile t+2 are already in flight (loads only block at first use). Triton's pipeliner turns
    the activation loads into a num_stages-deep cp.async ring, but it cannot do that for data-dependent
    gathers, which would otherwise stall every iteration on a full memory round trip.
    """
    rk = tl.arange(0, BLOCK_K)
    bytes_, start = _load_tile_bits(bitmap_ptr, group_offsets_ptr, rn, n_mask, k_first, k_end, W_BYTES, N_GROUPS,
                                    BLOCK_K)
    w = _gather_tile(values_ptr, row_base, bytes_, start, BLOCK_N, BLOCK_K)  # (BN, BK)
    bytes_, start = _load_tile_bits(bitmap_ptr, group_offsets_ptr, rn, n_mask, k_first + BLOCK_K, k_end, W_BYTES,
                                    N_GROUPS, BLOCK_K)
    for k0 in range(k_first, k_end, BLOCK_K):
        w_next = _gather_tile(values_ptr, row_base, bytes_, start, BLOCK_N, BLOCK_K)  # tile k0 + BLOCK_K
        bytes_, start = _load_tile_bits(bitmap_ptr, group_offsets_ptr, rn, n_mask, k0 + 2 * BLOCK_K, k_end,
                                        W_BYTES, N_GROUPS, BLOCK_K)
        cols = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None] & (cols < K)[None, :],
                    other=0.0)  # (BM, BK)
        acc = _mma(x, tl.trans(w.to(x.dtype)), acc, DOT_PRECISION, DOT_UPCAST)  # stage 2
        w = w_next
    return acc


@triton.jit
def _add_adapter(acc, h_ptr, b_ptr, R, stride_hm, stride_bn, rm, rn, m_mask, n_mask,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc[BM, BN] += H[rm, :R] · B_cat[rn, :R]ᵀ, R in steps of BLOCK_R (no step when R == 0)."""
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        h = tl.load(h_ptr + rm[:, None] * stride_hm + r[None, :], mask=m_mask[:, None] & (r < R)[None, :],
                    other=0.0)  # (BM, BR)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + r[:, None], mask=n_mask[None, :] & (r < R)[:, None],
                    other=0.0)  # (BR, BN)
        acc = _mma(h, b, acc, DOT_PRECISION, DOT_UPCAST)
    return acc


# ---------------------------------------------------------------------------------------------- kernels

@triton.autotune(configs=get_autotune_config(), key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def _salr_linear_kernel(
    # activations X [M, K] and output Y [M, N] (unit column stride)
    x_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    # bitmap weight W [N, K] and its derived tile offsets
    bitmap_ptr, values_ptr, row_offsets_ptr, group_offsets_ptr, W_BYTES, N_GROUPS,
    # adapters: H = X·A_catᵀ [M, R] (computed before), B_cat [N, R]
    h_ptr, b_ptr, R, stride_hm, stride_bn,
    # bias [N] (read only when HAS_BIAS)
    bias_ptr,
    # autotune key: next power of two of M
    M_BUCKET,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles in a row visit the same weight tiles while they sit in L2.
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) int64
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) int64
    m_mask = rm < M
    n_mask = rn < N
    row_base = tl.load(row_offsets_ptr + rn, mask=n_mask, other=0)  # (BN,) int64

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _sparse_k_loop(acc, x_ptr, stride_xm, rm, m_mask, 0, K, K,
                         bitmap_ptr, values_ptr, row_base, group_offsets_ptr, rn, n_mask, W_BYTES, N_GROUPS,
                         DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K)
    acc = _add_adapter(acc, h_ptr, b_ptr, R, stride_hm, stride_bn, rm, rn, m_mask, n_mask, DOT_PRECISION, DOT_UPCAST,
                       BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=get_gemv_autotune_config(), key=["M_BUCKET", "N", "K", "R"], reset_to_zero=["acc_ptr"])
@triton.jit
def _salr_gemv_kernel(
    # activations X [M, K] (M <= BLOCK_M) and the zeroed fp32 accumulator [M, N]
    x_ptr, acc_ptr, M, N, K, stride_xm, stride_am,
    # bitmap weight W [N, K] and its derived tile offsets
    bitmap_ptr, values_ptr, row_offsets_ptr, group_offsets_ptr, W_BYTES, N_GROUPS,
    # adapters: H = X·A_catᵀ [M, R], B_cat [N, R]
    h_ptr, b_ptr, R, stride_hm, stride_bn,
    # bias [N] (read only when HAS_BIAS)
    bias_ptr,
    # autotune key: next power of two of M
    M_BUCKET,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) int64
    m_mask = rm < M
    n_mask = rn < N
    row_base = tl.load(row_offsets_ptr + rn, mask=n_mask, other=0)  # (BN,) int64

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * per_split * BLOCK_K
    k_end = tl.minimum(k_first + per_split * BLOCK_K, K)  # an empty slice (k_first >= K) adds nothing
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _sparse_k_loop(acc, x_ptr, stride_xm, rm, m_mask, k_first, k_end, K,
                         bitmap_ptr, values_ptr, row_base, group_offsets_ptr, rn, n_mask, W_BYTES, N_GROUPS,
                         DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_K)
    if pid_k == 0:  # the adapter term and the bias are added once, by the first slice
        acc = _add_adapter(acc, h_ptr, b_ptr, R, stride_hm, stride_bn, rm, rn, m_mask, n_mask, DOT_PRECISION,
                           DOT_UPCAST, BLOCK_R)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(acc_ptr + rm[:, None] * stride_am + rn[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=get_dense_autotune_config(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _dense_nt_kernel(
    # A [M, K], B [N, K], C [M, N] = A·Bᵀ (unit column strides)
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
    # autotune key: next power of two of M
    M_BUCKET,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + rk
        k_mask = cols < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + cols[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)  # (BM, BK)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + cols[:, None], mask=n_mask[None, :] & k_mask[:, None],
                    other=0.0)  # (BK, BN)
        acc = _mma(a, b.to(a.dtype), acc, DOT_PRECISION, DOT_UPCAST)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _bitmap_decode_kernel(
    # bitmap weight W [N, K] and its derived tile offsets
    bitmap_ptr, values_ptr, row_offsets_ptr, group_offsets_ptr, W_BYTES, N_GROUPS,
    # dense output [N, K]
    out_ptr, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k0 = pid_k * BLOCK_K
    row_base = tl.load(row_offsets_ptr + rn, mask=n_mask, other=0)
    bytes_, start = _load_tile_bits(bitmap_ptr, group_offsets_ptr, rn, n_mask, k0, K, W_BYTES, N_GROUPS, BLOCK_K)
    w = _gather_tile(values_ptr, row_base, bytes_, start, BLOCK_N, BLOCK_K)  # (BN, BK)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (cols < K)[None, :])


# ------------------------------------------------------------------------------------------ validation

def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} {list(t.shape)} on {t.device}"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    _require(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is None:
        _require(t.dtype in _FLOAT_DTYPES, f"{name}: expected float16, bfloat16 or float32, got {_describe(t)}")
    else:
        _require(t.dtype == dtype, f"{name}: expected dtype {dtype} (the dtype of x), got {_describe(t)}")


def _check_device(first: str, x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    _require(x.is_cuda or _interpreting(),
             f"{first}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {_describe(x)}")
    for name, t in tensors.items():
        if t is not None:
            _require(t.device == x.device,
                     f"{name}: expected device {x.device} (the device of {first}), got {_describe(t)}")


def _check_bitmap(bitmap: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, k: int) -> int:
    """Shapes and dtypes of one bitmap weight of in_features k; returns N."""
    _require(k >= 1, f"in_features must be >= 1, got {k}")
    _require(isinstance(bitmap, torch.Tensor) and bitmap.dtype == torch.uint8 and bitmap.dim() == 2,
             f"bitmap: expected uint8 [N, ceil(K/8)], got "
             f"{_describe(bitmap) if isinstance(bitmap, torch.Tensor) else type(bitmap).__name__}")
    n = bitmap.shape[0]
    width = (k + 7) // 8
    _require(bitmap.shape[1] == width,
             f"bitmap: expected shape [N, ceil(K/8)] = [{n}, {width}] for K = {k}, got {list(bitmap.shape)}")
    _check_float("values", values)
    _require(values.dim() == 1, f"values: expected a 1-D tensor, got {_describe(values)}")
    _require(row_offsets.dtype == torch.int64 and tuple(row_offsets.shape) == (n + 1,),
             f"row_offsets: expected int64 [N + 1] = [{n + 1}], got {_describe(row_offsets)}")
    return n


def _resolve_group_offsets(group_offsets, bitmap, values, row_offsets, k) -> torch.Tensor:
    if group_offsets is None:
        return build_group_offsets(bitmap, row_offsets, values.numel(), k)
    n = bitmap.shape[0]
    groups = (k + GROUP_COLS - 1) // GROUP_COLS
    _require(group_offsets.dtype == torch.int32 and tuple(group_offsets.shape) == (n, groups),
             f"group_offsets: expected int32 [N, ceil(K/{GROUP_COLS})] = [{n}, {groups}] "
             f"(from build_group_offsets), got {_describe(group_offsets)}")
    _require(group_offsets.device == bitmap.device,
             f"group_offsets: expected device {bitmap.device}, got {group_offsets.device}")
    return group_offsets.contiguous()


def _dot_args(dtype: torch.dtype) -> dict:
    # fp32 inputs would otherwise go through TF32 (10-bit mantissa): IEEE keeps the fp32 contract.
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_UPCAST": _interpreting() and dtype == torch.bfloat16}


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)  # (M, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------------- forward

def _dense_nt(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] · b [N, K]ᵀ -> [M, N] in out_dtype (fp32 accumulation); both with unit column stride."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)  # (M, N)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _dense_nt_kernel[grid](a, b, c, m, n, k, a.stride(0), b.stride(0), c.stride(0), triton.next_power_of_2(m),
                           **_dot_args(a.dtype))
    return c


def salr_linear_forward(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                        a_cat: torch.Tensor, b_cat: torch.Tensor, bias: torch.Tensor | None = None, *,
                        group_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X·Wᵀ + (X·A_catᵀ)·B_catᵀ (+ bias) with W [N, K] in the bitmap format (the SALRLinear op).

    Args:
        x: [..., K] float16, bfloat16 or float32 (the compute dtype; accumulation is fp32).
        bitmap: uint8 [N, ceil(K/8)].
        values: [nnz] float16, bfloat16 or float32; cast to x's dtype inside the kernel.
        row_offsets: int64 [N + 1].
        a_cat: [R, K] in x's dtype (R may be 0).
        b_cat: [N, R] in x's dtype.
        bias: [N] in x's dtype, or None.
        group_offsets: `build_group_offsets(...)` of this weight, already validated; when None it is built
            here and the format's invariants are checked (one host synchronisation).

    Returns:
        Y [..., N] in x's dtype.

    Raises:
        ValueError: a shape, dtype or device does not match, or the bitmap breaks a format invariant.
    """
    _check_float("x", x)
    _require(x.dim() >= 1, f"x: expected [..., K], got {_describe(x)}")
    k = x.shape[-1]
    n = _check_bitmap(bitmap, values, row_offsets, k)
    _check_float("a_cat", a_cat, x.dtype)
    _require(a_cat.dim() == 2 and a_cat.shape[1] == k, f"a_cat: expected [R, K] with K = {k}, got {_describe(a_cat)}")
    r = a_cat.shape[0]
    _check_float("b_cat", b_cat, x.dtype)
    _require(tuple(b_cat.shape) == (n, r),
             f"b_cat: expected [N, R] = [{n}, {r}] (N = rows of bitmap, R = rows of a_cat), got {_describe(b_cat)}")
    if bias is not None:
        _check_float("bias", bias, x.dtype)
        _require(tuple(bias.shape) == (n,), f"bias: expected [N] = [{n}], got {_describe(bias)}")
    _check_device("x", x, bitmap=bitmap, values=values, row_offsets=row_offsets, a_cat=a_cat, b_cat=b_cat, bias=bias)
    group_offsets = _resolve_group_offsets(group_offsets, bitmap, values, row_offsets, k)

    x2 = _rows(x, k)  # (M, K)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    if m == 0 or n == 0:
        return x.new_empty(out_shape)
    bitmap, values, row_offsets = bitmap.contiguous(), values.contiguous(), row_offsets.contiguous()
    b2 = b_cat.contiguous()
    h = _dense_nt(x2, a_cat.contiguous(), x.dtype) if r > 0 else x2  # (M, R); x2 only stands in for a pointer
    if r == 0:
        b2 = x2
    bias_arg = bias.contiguous() if bias is not None else x2
    common = dict(
        bitmap_ptr=bitmap, values_ptr=values, row_offsets_ptr=row_offsets, group_offsets_ptr=group_offsets,
        W_BYTES=bitmap.shape[1], N_GROUPS=group_offsets.shape[1],
        h_ptr=h, b_ptr=b2, R=r, stride_hm=h.stride(0), stride_bn=b2.stride(0), bias_ptr=bias_arg,
        M_BUCKET=triton.next_power_of_2(m), HAS_BIAS=bias is not None, BLOCK_R=32, **_dot_args(x.dtype),
    )
    if m <= GEMV_MAX_M:
        acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)  # (M, N)

        def gemv_grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

        _salr_gemv_kernel[gemv_grid](x2, acc, m, n, k, x2.stride(0), acc.stride(0), **common)
        return acc.to(x.dtype).view(out_shape)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)  # (M, N)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _salr_linear_kernel[grid](x2, y, m, n, k, x2.stride(0), y.stride(0), **common)
    return y.view(out_shape)


def fused_adapter_gemm_forward(x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor) -> torch.Tensor:
    """Y = (X·A_catᵀ)·B_catᵀ (the FusedAdapterGemm op): two GEMMs, H kept in x's dtype.

    Args:
        x: [..., K] float16, bfloat16 or float32.
        a_cat: [R, K] in x's dtype.
        b_cat: [N, R] in x's dtype.

    Returns:
        Y [..., N] in x's dtype (zeros when R == 0).

    Raises:
        ValueError: a shape, dtype or device does not match.
    """
    _check_float("x", x)
    _require(x.dim() >= 1, f"x: expected [..., K], got {_describe(x)}")
    _check_float("a_cat", a_cat, x.dtype)
    _check_float("b_cat", b_cat, x.dtype)
    _require(a_cat.dim() == 2, f"a_cat: expected [R, K], got {_describe(a_cat)}")
    r, k = a_cat.shape
    _require(x.shape[-1] == k, f"x: expected last dimension K = {k} (columns of a_cat), got {_describe(x)}")
    _require(b_cat.dim() == 2 and b_cat.shape[1] == r,
             f"b_cat: expected [N, R] with R = {r} (rows of a_cat), got {_describe(b_cat)}")
    _check_device("x", x, a_cat=a_cat, b_cat=b_cat)
    n = b_cat.shape[0]
    x2 = _rows(x, k) if k > 0 else x.reshape(-1, 0)  # (M, K)
    if r == 0:
        return x.new_zeros((*x.shape[:-1], n))
    h = _dense_nt(x2, a_cat.contiguous(), x.dtype)  # (M, R)
    return _dense_nt(h, b_cat.contiguous(), x.dtype).view(*x.shape[:-1], n)


def bitmap_decode_forward(bitmap: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, in_features: int,
                          *, dtype: torch.dtype | None = None,
                          group_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The dense W [N, K] of a bitmap weight (the BitmapDecode op), zeros at pruned positions.

    Args:
        bitmap, values, row_offsets: the weight (see `salr_linear_forward`).
        in_features: K.
        dtype: output dtype; default: the values' dtype.
        group_offsets: as in `salr_linear_forward`.

    Raises:
        ValueError: a shape, dtype or device does not match, or the bitmap breaks a format invariant.
    """
    n = _check_bitmap(bitmap, values, row_offsets, in_features)
    _check_device("bitmap", bitmap, values=values, row_offsets=row_offsets)
    group_offsets = _resolve_group_offsets(group_offsets, bitmap, values, row_offsets, in_features)
    out = torch.empty((n, in_features), dtype=dtype or values.dtype, device=bitmap.device)  # (N, K)
    if n == 0:
        return out
    block_n, block_k = 32, 128  # memory-bound copy: one fixed tile, no tuning to gain

    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    _bitmap_decode_kernel[grid](bitmap.contiguous(), values.contiguous(), row_offsets.contiguous(), group_offsets,
                                bitmap.shape[1], group_offsets.shape[1], out, n, in_features,
                                BLOCK_N=block_n, BLOCK_K=block_k)
    return out
