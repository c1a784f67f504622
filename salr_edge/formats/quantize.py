"""Symmetric group quantization of the bitmap format's kept values (format version 2).

The values of a v2 tensor are integers q with one float16 scale per group of `group_size` consecutive
values in storage order (row by row, so a group may span rows): value i = q_i * scales[i // group_size].

- bits = 8: int8 [nnz], q in [-127, 127] (-128 is never produced, so the range is symmetric).
- bits = 4: uint8 [ceil(nnz / 2)], value i in nibble i % 2 of byte i // 2 (low nibble first); a nibble u
  encodes q = u - 8, so q in [-8, 7]; when nnz is odd the last byte's high nibble is 0.

Pure tensor functions, testable on CPU.
"""

from __future__ import annotations

import torch

QUANT_BITS = (4, 8)
# q = u - INT4_OFFSET for a stored nibble u
INT4_OFFSET = 8
# Clipping ratios of a group's max |v| tried by the scale search: a smaller range trades clipping the
# largest value for finer steps everywhere else, which wins for groups with one outlier.
DEFAULT_CLIP_RATIOS = torch.linspace(0.5, 1.0, 20)
_FP16_MAX = torch.finfo(torch.float16).max


def qrange(bits: int) -> tuple[int, int]:
    """(q_min, q_max) of the stored integers for `bits` (8: [-127, 127], 4: [-8, 7])."""
    check_bits(bits)
    return (-127, 127) if bits == 8 else (-INT4_OFFSET, INT4_OFFSET - 1)


def check_bits(bits: object) -> None:
    """Raise ValueError unless `bits` is one of `QUANT_BITS`."""
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits!r}")


def check_group_size(group_size: object) -> None:
    """Raise ValueError unless `group_size` is an integer >= 1."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")


def num_groups(nnz: int, group_size: int) -> int:
    """Number of scales of `nnz` values: ceil(nnz / group_size)."""
    return -(-nnz // group_size)


def packed_length(nnz: int, bits: int) -> int:
    """Length of the stored `values` of `nnz` values: nnz (int8) or ceil(nnz / 2) (packed int4)."""
    check_bits(bits)
    return nnz if bits == 8 else -(-nnz // 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values q [n] (in [-8, 7]) into uint8 [ceil(n/2)], low nibble first, an odd tail's high nibble 0."""
    if q.dim() != 1:
        raise ValueError(f"pack_int4 expects a 1-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -INT4_OFFSET or int(q.max()) >= INT4_OFFSET):
        raise ValueError(f"int4 values must be in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8)  # (n,) nibbles 0..15
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])  # the contract wants an unused high nibble of 0, not q = 0's 8
    pairs = u.reshape(-1, 2)  # (ceil(n/2), 2): [low, high]
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n int4 values (int8, in [-8, 7]) stored in `packed` uint8 [ceil(n/2)]."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed int4 values must be 1-D uint8, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != -(-n // 2):
        raise ValueError(f"{n} int4 values need {-(-n // 2)} bytes, got {packed.numel()}")
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n]  # (n,)
    return (nibbles.to(torch.int8) - INT4_OFFSET).contiguous()


def stored_to_int(values: torch.Tensor, bits: int, nnz: int) -> torch.Tensor:
    """The integers q (int8 [nnz]) that stored `values` hold."""
    check_bits(bits)
    return values.to(torch.int8) if bits == 8 else unpack_int4(values, nnz)


def int_to_stored(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored `values` for integers q [nnz]: int8 as they are, or packed int4."""
    check_bits(bits)
    return q.to(torch.int8).contiguous() if bits == 8 else pack_int4(q)


def dequantize_values(values: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                      nnz: int | None = None) -> torch.Tensor:
    """The float32 values [nnz] = q_i * scales[i // group_size] (exact in float32: q has <= 8 bits, scales 11).

    Args:
        values: stored integers (int8 [nnz] or packed uint8 [ceil(nnz/2)]).
        scales: float16 [ceil(nnz / group_size)].
        nnz: number of values; default: len(values) for int8, 2 * len(values) for int4 (give it for odd nnz).
    """
    check_group_size(group_size)
    if nnz is None:
        nnz = values.numel() * (2 if bits == 4 else 1)
    q = stored_to_int(values, bits, nnz)  # (nnz,)
    group = torch.arange(nnz, device=q.device) // group_size  # (nnz,) the scale of each value
    return q.float() * scales.float().to(q.device)[group]


def quantize_values(values: torch.Tensor, bits: int, group_size: int,
                    clip_ratios: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization per group, with a per-group search of the clipping range.

    For each group of `group_size` consecutive values with largest magnitude m, every ratio r of
    `clip_ratios` gives a scale s = fp16(r·m / q_max); the values become q = clamp(round(v / s)) and
    the group keeps the scale whose dequantized group q·s has the least squared error. The search runs
    over all groups at once, one ratio at a time (memory stays O(nnz)); the error is measured with the
    fp16-rounded scale, the one that is stored and used.

    Args:
        values: 1-D float [nnz], storage order.
        bits: 4 or 8.
        group_size: values per scale, >= 1.
        clip_ratios: ratios of the group max to try (default 20 steps from 0.5 to 1.0).

    Returns:
        (stored values, scales): int8 [nnz] or packed uint8 [ceil(nnz/2)], and float16 [ceil(nnz/group_size)].

    Raises:
        ValueError: bad `bits`/`group_size`, values not 1-D or not finite.
    """
    check_bits(bits)
    check_group_size(group_size)
    if values.dim() != 1:
        raise ValueError(f"quantize_values expects 1-D values, got shape {tuple(values.shape)}")
    v = values.detach().float()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("quantize_values: values hold NaN or Inf")
    nnz = v.numel()
    q_min, q_max = qrange(bits)
    groups = num_groups(nnz, group_size)
    padded = v.new_zeros(groups * group_size)
    padded[:nnz] = v
    grouped = padded.reshape(groups, group_size)  # (G, gs); padding zeros quantize to 0 at any scale
    absmax = grouped.abs().amax(dim=1) if groups else v.new_zeros(0)  # (G,)
    ratios = DEFAULT_CLIP_RATIOS if clip_ratios is None else clip_ratios.float()
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = torch.zeros_like(absmax)
    for ratio in ratios.tolist():
        # fp16-rounded (and capped, so no scale is Inf), then measured as stored
        scale = (absmax * ratio / q_max).clamp(max=_FP16_MAX).half().float()  # (G,)
        q = _round_clamp(grouped, scale, q_min, q_max)  # (G, gs)
        err = (q * scale[:, None] - grouped).square().sum(dim=1)  # (G,)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    q = _round_clamp(grouped, best_scale, q_min, q_max).reshape(-1)[:nnz].to(torch.int8)  # (nnz,)
    return int_to_stored(q, bits), best_scale.half()


def _round_clamp(grouped: torch.Tensor, scale: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """round(v / s) clamped to [q_min, q_max], as float; a zero scale (an all-zero group) gives q = 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]  # (G, 1)
    q = torch.round(grouped / safe).clamp(q_min, q_max)
    return torch.where(scale[:, None] > 0, q, torch.zeros_like(q))
