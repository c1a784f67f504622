"""Truncated SVD of a residual, split into a low-rank adapter pair."""

from __future__ import annotations

import torch


def truncated_svd(matrix: torch.Tensor, rank: int, method: str = "full", niter: int = 4,
                  oversample: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation B·A of `matrix` [N, K].

    The singular values are split evenly (A = √S·Vᵀ, B = U·√S) so both factors have comparable
    scale, which is what makes them well-conditioned for fine-tuning as adapters.

    Args:
        matrix: [N, K].
        rank: 0 < rank <= min(N, K).
        method: "full" (exact, `torch.linalg.svd`) or "randomized" (`torch.svd_lowrank` with
            `oversample` extra columns and `niter` power iterations; for large matrices).

    Returns:
        A [rank, K] and B [N, rank], float32.
    """
    n, k = matrix.shape
    if not 0 < rank <= min(n, k):
        raise ValueError(f"rank must be in [1, min(d, k)] = [1, {min(n, k)}] for a {n}x{k} matrix, got {rank}")
    m = matrix.detach().float()
    if method == "full":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    elif method == "randomized":
        q = min(rank + oversample, n, k)
        u, s, v = torch.svd_lowrank(m, q=q, niter=niter)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    else:
        raise ValueError(f"method must be 'full' or 'randomized', got {method!r}")
    root = s.sqrt()
    return (root[:, None] * v.T).contiguous(), (u * root[None, :]).contiguous()
