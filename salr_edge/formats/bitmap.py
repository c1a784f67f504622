"""The bitmap sparse format, version 1 ("salr-bitmap-v1").

Layout of a linear weight W of shape [N, K] (N = out_features, K = in_features, row-major as in
`nn.Linear`):

- ``bitmap``: uint8 [N, ceil(K/8)]. Bit j (least significant first) of byte g in row n is 1 iff
  W[n, 8g+j] is kept. Padding bits past K are 0.
- ``values``: 1-D, the kept entries row by row, columns ascending; float16, bfloat16 or float32.
- ``row_offsets``: int64 [N+1]; ``row_offsets[n]`` is where row n starts in ``values`` and
  ``row_offsets[N] == len(values)``.

Kernels may derive extra indexing at load time; that is not part of the stored format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FORMAT_NAME = "salr-bitmap-v1"
FORMAT_VERSION = 1
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# popcount of every byte value, for the per-row popcount invariant
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


class BitmapFormatError(ValueError):
    """A bitmap tensor breaks one of the format's invariants."""


@dataclass
class BitmapTensor:
    """A [N, K] weight in the bitmap format (see the module docstring)."""

    bitmap: torch.Tensor  # (N, ceil(K/8)) uint8
    values: torch.Tensor  # (nnz,) float
    row_offsets: torch.Tensor  # (N+1,) int64
    shape: tuple[int, int]  # (N, K)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / max(1, n * k)

    def nbytes(self) -> int:
        """Stored bytes: bitmap + values + row offsets."""
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.values, self.row_offsets))

    def to(self, dtype: torch.dtype) -> "BitmapTensor":
        """Return a copy whose values have `dtype` (the bitmap and offsets are shared)."""
        return BitmapTensor(self.bitmap, self.values.to(dtype), self.row_offsets, self.shape)


def packed_width(in_features: int) -> int:
    """Bytes per bitmap row: ceil(K / 8)."""
    return (in_features + 7) // 8


def stored_layer_bytes(out_features: int, in_features: int, nnz: int, rank: int = 0, value_bytes: int = 2,
                       adapter_bytes: int = 2) -> int:
    """Stored bytes of one compressed layer: bitmap + values + int64 row offsets + adapters A [r, K], B [N, r].

    The one size formula every budget and size table counts with.
    """
    return (out_features * packed_width(in_features) + nnz * value_bytes + 8 * (out_features + 1)
            + rank * (out_features + in_features) * adapter_bytes)


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
    counts = mask.sum(dim=1, dtype=torch.int64)  # (N,)
    row_offsets = torch.zeros(weight.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, dim=0, out=row_offsets[1:])
    values = weight[mask].to(values_dtype).contiguous()  # row-major boolean indexing: rows, columns ascending
    return BitmapTensor(pack_mask(mask), values, row_offsets, (int(weight.shape[0]), int(weight.shape[1])))


def bitmap_mask(t: BitmapTensor) -> torch.Tensor:
    """The bool mask [N, K] of kept entries."""
    return unpack_mask(t.bitmap, t.shape[1])


def bitmap_decode(t: BitmapTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode into a dense [N, K] tensor (zeros at pruned positions). Validates first."""
    validate(t)
    dense = torch.zeros(t.shape, dtype=dtype or t.values.dtype)
    dense[bitmap_mask(t)] = t.values.to(dense.dtype)
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
    if int(offsets[-1]) != t.values.numel():
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
