"""Pruning masks: importance scores (magnitude, Wanda) and their selection at a granularity.

Pure tensor functions, testable on CPU without a model.
"""

from __future__ import annotations

import torch

from ..config import parse_granularity


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| (the SALR paper's criterion)."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's |W_ij| * ||X_j||_2, with ``input_norms`` [K] the L2 norm of each input feature."""
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(f"input_norms must have shape ({weight.shape[1]},), got {tuple(input_norms.shape)}")
    return weight.detach().abs().float() * input_norms.float().to(weight.device)[None, :]


def _keep_top(scores: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        idx = scores.topk(keep, dim=dim).indices
        mask.scatter_(dim, idx, True)
    return mask


def select_mask(scores: torch.Tensor, sparsity: float, granularity: str = "matrix") -> torch.Tensor:
    """Keep the highest scores.

    Args:
        scores: [N, K] importance, higher is kept first.
        sparsity: fraction to drop, in [0, 1) (ignored for N:M, which fixes it).
        granularity: "matrix" (one budget for the whole matrix), "row" (per output row) or "N:M"
            (N kept in every aligned group of M inputs; a trailing partial group of g < M inputs keeps
            min(N, g)).

    Returns:
        bool [N, K], True where kept.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    kind, n, m = parse_granularity(granularity)
    rows, cols = scores.shape
    if kind == "matrix":
        keep = scores.numel() - int(round(sparsity * scores.numel()))
        return _keep_top(scores.reshape(1, -1), keep, dim=1).reshape(rows, cols)
    if kind == "row":
        return _keep_top(scores, cols - int(round(sparsity * cols)), dim=1)
    groups = -(-cols // m)
    padded = scores.new_full((rows, groups * m), float("-inf"))
    padded[:, :cols] = scores
    grouped = padded.reshape(rows, groups, m)  # (N, G, M)
    mask = _keep_top(grouped, n, dim=2).reshape(rows, groups * m)[:, :cols]
    return mask


def is_nm_sparse(mask: torch.Tensor, n: int, m: int) -> bool:
    """True iff every aligned group of m columns keeps at most n entries."""
    rows, cols = mask.shape
    groups = -(-cols // m)
    padded = torch.zeros(rows, groups * m, dtype=torch.int32)
    padded[:, :cols] = mask.to(torch.int32)
    return bool((padded.reshape(rows, groups, m).sum(-1) <= n).all())
