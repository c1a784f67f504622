"""Derived indexing of the bitmap format for the Triton kernels (pure torch: no triton import).

The stored format (DESIGN.md §2) gives one offset per row. A kernel that starts in the middle of a row (a
K tile, a split-K slice) needs the number of kept entries before its first column. `build_group_offsets`
derives that once per weight: ``group_offsets[n, g]`` = kept entries of row n in columns [0, 64·g), an
int32 [N, ceil(K/64)] table (1/16 of a bit per weight on top of the 9 bits of fp16 values + bitmap).
It is derived at load time and never stored, as the format allows.

The same pass checks every invariant a kernel relies on before it trusts the data: with a broken
offset or popcount, a kernel's gather would read outside `values`, which on a GPU is a device fault
instead of an error message.
"""

from __future__ import annotations

import torch

GROUP_COLS = 64  # columns per group_offsets entry; every Triton BLOCK_K is a multiple of it
GROUP_BYTES = GROUP_COLS // 8

_POPCOUNT_CACHE: dict[torch.device, torch.Tensor] = {}


def _popcount_table(device: torch.device) -> torch.Tensor:
    table = _POPCOUNT_CACHE.get(device)
    if table is None:
        table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32, device=device)
        _POPCOUNT_CACHE[device] = table
    return table


def build_group_offsets(bitmap: torch.Tensor, row_offsets: torch.Tensor, nnz: int, in_features: int,
                        validate: bool = True) -> torch.Tensor:
    """Per-row, per-64-column-group value offsets, after checking the format's invariants.

    Args:
        bitmap: uint8 [N, ceil(K/8)].
        row_offsets: int64 [N + 1].
        nnz: len(values).
        in_features: K.
        validate: check offsets (start 0, non-decreasing, end nnz), per-row popcounts and padding bits.

    Returns:
        int32 [N, ceil(K/64)] on the bitmap's device: entry [n, g] counts the kept entries of row n before
        column 64·g.

    Raises:
        ValueError: naming the first broken invariant (its row where there is one).
    """
    n, width = bitmap.shape
    k = in_features
    device = bitmap.device
    groups = (k + GROUP_COLS - 1) // GROUP_COLS
    pad_width = groups * GROUP_BYTES
    counts = _popcount_table(device)[bitmap.to(torch.int64)]  # (N, W) int32
    if pad_width != width:
        counts = torch.nn.functional.pad(counts, (0, pad_width - width))
    per_group = counts.view(n, groups, GROUP_BYTES).sum(dim=2, dtype=torch.int32)  # (N, G)
    group_offsets = torch.cumsum(per_group, dim=1, dtype=torch.int32) - per_group  # exclusive scan
    if validate and n > 0:
        _check(bitmap, row_offsets, per_group.sum(dim=1, dtype=torch.int64), nnz, k)
    elif validate and (row_offsets.numel() != 1 or int(row_offsets[0]) != 0 or nnz != 0):
        raise ValueError(f"an empty weight (N = 0) needs row_offsets == [0] and no values, got "
                         f"row_offsets {row_offsets.tolist()} and {nnz} values")
    return group_offsets.contiguous()


def _check(bitmap: torch.Tensor, row_offsets: torch.Tensor, row_counts: torch.Tensor, nnz: int, k: int) -> None:
    """One host round trip: every row's flags are reduced on the device and only the verdict is copied."""
    first, last = row_offsets[0], row_offsets[-1]
    steps = row_offsets[1:] - row_offsets[:-1]  # (N,)
    decreasing = steps < 0
    mismatch = steps != row_counts
    if k % 8:
        padding = (bitmap[:, -1].to(torch.int32) >> (k % 8)) != 0
    else:
        padding = torch.zeros_like(decreasing)
    summary = torch.stack([first, last, decreasing.any().long(), mismatch.any().long(), padding.any().long()]).tolist()
    if summary[0] != 0:
        raise ValueError(f"row_offsets[0] must be 0, got {summary[0]}")
    if summary[1] != nnz:
        raise ValueError(f"row_offsets[-1] must equal len(values) = {nnz}, got {summary[1]}")
    if summary[2]:
        row = int(torch.nonzero(decreasing)[0])
        raise ValueError(f"row_offsets must be non-decreasing, got row_offsets[{row}] = {int(row_offsets[row])} > "
                         f"row_offsets[{row + 1}] = {int(row_offsets[row + 1])}")
    if summary[4]:
        row = int(torch.nonzero(padding)[0])
        raise ValueError(f"bitmap padding bits past in_features = {k} must be 0, got byte "
                         f"{int(bitmap[row, -1]):#04x} in row {row}")
    if summary[3]:
        row = int(torch.nonzero(mismatch)[0])
        raise ValueError(f"bitmap row {row} keeps {int(row_counts[row])} entries (popcount) but row_offsets give "
                         f"{int(steps[row])}")


def encode_on_device(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bitmap-encode a [N, K] weight where it lives (the CPU encoder in salr_edge.formats copies to host).

    Returns:
        (bitmap uint8 [N, ceil(K/8)], values [nnz] in the weight's dtype, row_offsets int64 [N + 1]), the
        same bytes as `salr_edge.formats.bitmap.bitmap_encode(weight, mask)`.
    """
    n, k = weight.shape
    width = (k + 7) // 8
    mask = mask.to(device=weight.device, dtype=torch.bool)
    bits = torch.zeros(n, width * 8, dtype=torch.int32, device=weight.device)
    bits[:, :k] = mask.to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32, device=weight.device)
    bitmap = (bits.view(n, width, 8) << shifts).sum(dim=2).to(torch.uint8)  # (N, W)
    values = weight[mask].contiguous()  # row-major boolean indexing: rows in order, columns ascending
    row_offsets = torch.zeros(n + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(mask.sum(dim=1, dtype=torch.int64), dim=0, out=row_offsets[1:])
    return bitmap, values, row_offsets
