"""The bitmap sparse format: version 1 ("salr-bitmap-v1", float values) and 2 ("salr-bitmap-v2", integers).

Layout of a linear weight W of shape [N, K] (N = out_features, K = in_features, row-major as in
`nn.Linear`):

- ``bitmap``: uint8 [N, ceil(K/8)]. Bit j (least significant first) of byte g in row n is 1 iff
  W[n, 8g+j] is kept. Padding bits past K are 0.
- ``values``: 1-D, the kept entries row by row, columns ascending.
  Version 1: float16, bfloat16 or float32 [nnz].
  Version 2 (``bits`` = 8): int8 [nnz], q in [-127, 127]; (``bits`` = 4): uint8 [ceil(nnz/2)], value i
  in nibble i % 2 of byte i // 2 (low nibble first), a nibble u encodes q = u - 8; when nnz is odd the
  last byte's high nibble is 0.
- ``row_offsets``: int64 [N+1]; ``row_offsets[n]`` is where row n starts among the values (a count of
  values, not of bytes) and ``row_offsets[N] == nnz``.
- ``scales`` (version 2 only): float16 [ceil(nnz/group_size)]; value i is q_i * scales[i // group_size].
  Groups are runs of ``group_size`` consecutive values in storage order, so a group may span rows.
  Symmetric, no zero points (see `salr_edge.formats.quantize`).

Kernels may derive extra indexing at load time; that is not part of the stored format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .quantize import check_bits, check_group_size, dequantize_values, num_groups, packed_length, quantize_values

FORMAT_NAME = "salr-bitmap-v1"
FORMAT_VERSION = 1
FORMAT_NAME_V2 = "salr-bitmap-v2"
FORMAT_VERSION_V2 = 2
# Every version this library reads and writes, by number.
FORMAT_NAMES = {FORMAT_VERSION: FORMAT_NAME, FORMAT_VERSION_V2: FORMAT_NAME_V2}
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dtype of the stored integers of a version-2 tensor, by bits
QUANT_VALUE_DTYPES = {8: torch.int8, 4: torch.uint8}

# popcount of every byte value, for the per-row popcount invariant
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


class BitmapFormatError(ValueError):
    """A bitmap tensor breaks one of the format's invariants."""


@dataclass
class BitmapTensor:
    """A [N, K] weight in the bitmap format (see the module docstring).

    `bits` None is version 1 (float `values`, no `scales`); 4 or 8 is version 2 (integer `values`,
    float16 `scales`, one per `group_size` values).
    """

    bitmap: torch.Tensor  # (N, ceil(K/8)) uint8
    values: torch.Tensor  # (nnz,) float | (nnz,) int8 | (ceil(nnz/2),) uint8
    row_offsets: torch.Tensor  # (N+1,) int64
    shape: tuple[int, int]  # (N, K)
    scales: torch.Tensor | None = None  # (ceil(nnz/group_size),) float16, version 2 only
    bits: int | None = None
    group_size: int | None = None

    @property
    def is_quantized(self) -> bool:
        return self.bits is not None

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION_V2 if self.is_quantized else FORMAT_VERSION

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES[self.format_version]

    @property
    def nnz(self) -> int:
        """Number of kept entries (packed int4 values hold two per byte, so this is not len(values))."""
        if not self.is_quantized:
            return int(self.values.numel())
        return int(self.row_offsets[-1]) if self.row_offsets.numel() else 0

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / max(1, n * k)

    def nbytes(self) -> int:
        """Stored bytes: bitmap + values + row offsets (+ scales)."""
        parts = [self.bitmap, self.values, self.row_offsets] + ([self.scales] if self.scales is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, dtype: torch.dtype) -> "BitmapTensor":
        """Return a copy whose float values have `dtype` (the bitmap and offsets are shared).

        Raises:
            BitmapFormatError: the values are quantized integers (use `bitmap_decode` to get floats).
        """
        if self.is_quantized:
            raise BitmapFormatError(f"cannot cast the int{self.bits} values of a {self.format_name} tensor to "
                                    f"{dtype}; decode it with bitmap_decode")
        return BitmapTensor(self.bitmap, self.values.to(dtype), self.row_offsets, self.shape)


def packed_width(in_features: int) -> int:
    """Bytes per bitmap row: ceil(K / 8)."""
    return (in_features + 7) // 8


def values_nbytes(nnz: int, value_bytes: int = 2, bits: int | None = None, group_size: int | None = None) -> int:
    """Stored bytes of `nnz` kept values: nnz * value_bytes (version 1), or with `bits` (version 2) the
    integers (nnz or ceil(nnz/2) bytes) plus one float16 scale per `group_size` values."""
    if bits is None:
        return nnz * value_bytes
    if group_size is None:
        raise ValueError("values_nbytes: quantized values (bits given) need a group_size")
    check_group_size(group_size)
    return packed_length(nnz, bits) + 2 * num_groups(nnz, group_size)


def stored_layer_bytes(out_features: int, in_features: int, nnz: int, rank: int = 0, value_bytes: int = 2,
                       adapter_bytes: int = 2, bits: int | None = None, group_size: int | None = None) -> int:
    """Stored bytes of one compressed layer: bitmap + values + int64 row offsets + adapters A [r, K], B [N, r].

    The one size formula every budget and size table counts with. With `bits` (4 or 8) the values are
    counted as version 2 (integers + float16 group scales, see `values_nbytes`) and `value_bytes` is unused.
    """
    return (out_features * packed_width(in_features) + values_nbytes(nnz, value_bytes, bits, group_size)
            + 8 * (out_features + 1) + rank * (out_features + in_features) * adapter_bytes)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask [N, K] into the uint8 bitmap [N, ceil(K/8)], least significant bit first."""
    packed = np.packbits(mask.detach().cpu().numpy().astype(bool), axis=1, bitorder="little")
    return torch.from_numpy(packed)


def unpack_mask(bitmap: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack a uint8 bitmap [N, ceil(K/8)] into a bool mask [N, K]."""
    bits = np.unpackbits(bitmap.cpu().numpy(), axis=1, count=in_features, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def bitmap_encode(weight: torch.Tensor, mask: torch.Tensor | None = None,
                  values_dtype: torch.dtype | None = None) -> BitmapTensor:
    """Encode a 2-D weight into the bitmap format.

    Args:
        weight: [N, K] weight.
        mask: bool [N, K] of kept entries; default: the non-zeros of `weight`. A kept entry whose
            value is zero is stored as an explicit zero.
        values_dtype: dtype of `values`; default: the weight's dtype.

    Returns:
        The encoded tensor.
    """
    if weight.dim() != 2:
        raise BitmapFormatError(f"bitmap_encode expects a 2-D weight, got shape {tuple(weight.shape)}")
    weight = weight.detach().cpu()
    mask = (weight != 0) if mask is None else mask.detach().cpu().bool()
    if mask.shape != weight.shape:
        raise BitmapFormatError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    values_dtype = values_dtype or weight.dtype
    if values_dtype not in VALUE_DTYPES:
        raise BitmapFormatError(f"unsupported values dtype {values_dtype}; expected one of {VALUE_DTYPES}")
    values = weight[mask].to(values_dtype).contiguous()  # row-major boolean indexing: rows, columns ascending
    return BitmapTensor(pack_mask(mask), values, mask_row_offsets(mask), (int(weight.shape[0]), int(weight.shape[1])))


def mask_row_offsets(mask: torch.Tensor) -> torch.Tensor:
    """int64 [N+1] row offsets of the kept entries of a bool mask [N, K]."""
    counts = mask.detach().cpu().sum(dim=1, dtype=torch.int64)  # (N,)
    row_offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, dim=0, out=row_offsets[1:])
    return row_offsets


def quantize_bitmap(t: BitmapTensor, bits: int, group_size: int) -> BitmapTensor:
    """The version-2 tensor of a version-1 one: its values quantized (`quantize_values`), bitmap and offsets shared.

    Raises:
        BitmapFormatError: `t` is malformed or already quantized (quantizing twice compounds the error).
        ValueError: bad `bits` or `group_size`.
    """
    validate(t)
    if t.is_quantized:
        raise BitmapFormatError(f"the tensor is already quantized (int{t.bits}, group_size {t.group_size})")
    values, scales = quantize_values(t.values.float(), bits, group_size)
    return BitmapTensor(t.bitmap, values, t.row_offsets, t.shape, scales, bits, group_size)


def bitmap_mask(t: BitmapTensor) -> torch.Tensor:
    """The bool mask [N, K] of kept entries."""
    return unpack_mask(t.bitmap, t.shape[1])


def bitmap_values(t: BitmapTensor) -> torch.Tensor:
    """The kept values as floats [nnz]: as stored (version 1), or dequantized in float32 (version 2)."""
    if not t.is_quantized:
        return t.values
    return dequantize_values(t.values, t.scales, t.bits, t.group_size, t.nnz)


def bitmap_decode(t: BitmapTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode into a dense [N, K] tensor (zeros at pruned positions). Validates first.

    Args:
        dtype: of the result; default: the values' dtype (version 1) or float32 (version 2, where the
            dequantized values q * scale are exact).
    """
    validate(t)
    values = bitmap_values(t)  # (nnz,)
    dense = torch.zeros(t.shape, dtype=dtype or values.dtype)
    dense[bitmap_mask(t)] = values.to(dense.dtype)
    return dense


def validate(t: BitmapTensor) -> None:
    """Check every invariant of the format.

    Raises:
        BitmapFormatError: naming the first broken invariant.
    """
    if len(t.shape) != 2 or min(t.shape) < 0:
        raise BitmapFormatError(f"shape must be (out_features, in_features), got {t.shape}")
    n, k = t.shape
    if t.bitmap.dtype != torch.uint8:
        raise BitmapFormatError(f"bitmap dtype must be uint8, got {t.bitmap.dtype}")
    if tuple(t.bitmap.shape) != (n, packed_width(k)):
        raise BitmapFormatError(
            f"bitmap shape {tuple(t.bitmap.shape)} does not match in_features={k}: expected {(n, packed_width(k))}")
    if t.values.dim() != 1:
        raise BitmapFormatError(f"values must be 1-D, got shape {tuple(t.values.shape)}")
    if not t.is_quantized:
        if t.scales is not None or t.group_size is not None:
            raise BitmapFormatError("scales/group_size are given but bits is None: float values (version 1) "
                                    "have no scales; set bits=4 or 8 for quantized values")
        if t.values.dtype not in VALUE_DTYPES:
            raise BitmapFormatError(f"values dtype {t.values.dtype} is not one of {VALUE_DTYPES}")
    if t.row_offsets.dtype != torch.int64 or tuple(t.row_offsets.shape) != (n + 1,):
        raise BitmapFormatError(
            f"row_offsets must be int64 of shape ({n + 1},), got {t.row_offsets.dtype} {tuple(t.row_offsets.shape)}")
    offsets = t.row_offsets
    if int(offsets[0]) != 0:
        raise BitmapFormatError(f"row_offsets[0] must be 0, got {int(offsets[0])}")
    if n > 0 and bool((offsets[1:] < offsets[:-1]).any()):
        row = int(torch.nonzero(offsets[1:] < offsets[:-1])[0])
        raise BitmapFormatError(f"row_offsets decrease at row {row}")
    if t.is_quantized:
        _validate_quantized(t, int(offsets[-1]))
    elif int(offsets[-1]) != t.values.numel():
        raise BitmapFormatError(f"row_offsets[-1]={int(offsets[-1])} != len(values)={t.values.numel()}")
    if k % 8 and n > 0:
        pad = (t.bitmap[:, -1].to(torch.int64) >> (k % 8)) != 0
        if bool(pad.any()):
            raise BitmapFormatError(f"padding bits past in_features={k} are set in row {int(torch.nonzero(pad)[0])}")
    counts = _POPCOUNT[t.bitmap.to(torch.int64)].sum(dim=1)  # (N,)
    bad = counts != (offsets[1:] - offsets[:-1])
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise BitmapFormatError(
            f"row {row}: bitmap has {int(counts[row])} set bits but row_offsets give "
            f"{int(offsets[row + 1] - offsets[row])} values")


def _validate_quantized(t: BitmapTensor, nnz: int) -> None:
    """The version-2 invariants: bits, group_size, the stored integers and the scales, for `nnz` values."""
    try:
        check_bits(t.bits)
    except ValueError:
        raise BitmapFormatError(f"unknown bits value {t.bits!r}: expected 4 or 8 (or None for float values)") from None
    try:
        check_group_size(t.group_size)
    except ValueError:
        raise BitmapFormatError(f"group_size must be an integer >= 1, got {t.group_size!r}") from None
    dtype = QUANT_VALUE_DTYPES[t.bits]
    if t.values.dtype != dtype:
        raise BitmapFormatError(f"int{t.bits} values must be stored as {dtype}, got {t.values.dtype}")
    expected = packed_length(nnz, t.bits)
    if t.values.numel() != expected:
        what = "nnz" if t.bits == 8 else "ceil(nnz/2)"
        raise BitmapFormatError(f"int{t.bits} values: row_offsets[-1]={nnz} kept entries need {what}={expected} "
                                f"stored elements, got {t.values.numel()}")
    if t.bits == 8 and nnz and int(t.values.min()) < -127:
        raise BitmapFormatError("int8 values hold -128; q must be in [-127, 127]")
    if t.bits == 4 and nnz % 2 and int(t.values[-1]) >> 4:
        raise BitmapFormatError(f"int4 values: the unused high nibble of the last byte (nnz={nnz} is odd) must "
                                f"be 0, got {int(t.values[-1]) >> 4}")
    if t.scales is None:
        raise BitmapFormatError(f"int{t.bits} values need scales (float16 [ceil(nnz/group_size)]), got None")
    if t.scales.dtype != torch.float16:
        raise BitmapFormatError(f"scales must be float16, got {t.scales.dtype}")
    groups = num_groups(nnz, t.group_size)
    if t.scales.dim() != 1 or t.scales.numel() != groups:
        raise BitmapFormatError(f"scales must have shape ({groups},) = ceil(nnz={nnz} / group_size={t.group_size}), "
                                f"got {tuple(t.scales.shape)}")
    if not bool(torch.isfinite(t.scales).all()):
        raise BitmapFormatError("scales hold NaN or Inf")
