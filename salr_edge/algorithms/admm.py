"""SALAAD's math: proximal operators, one ADMM round, and the threshold controller.

Pure tensor functions (no model, no distributed state), unit-tested on CPU. For one weight X [d, k]:

    min ℓ(X) + α‖L‖* + β‖S‖₁   s.t.  X = L + S

with the augmented-Lagrangian penalty (ρ/2)‖X − L − S + Y/ρ‖² that training adds to ℓ. One ADMM round:

    L ← SVT(X − S + Y/ρ, α/ρ)        (singular-value thresholding: the prox of ‖·‖*)
    S ← soft(X − L + Y/ρ, β/ρ)       (elementwise soft thresholding: the prox of ‖·‖₁)
    Y ← Y + ρ (X − L − S)            (dual ascent)

L is kept factored (U [d, r], σ [r], Vᴴ [r, k], σ descending, zero singular values dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """L = U · diag(s) · Vh with s descending and positive; r = len(s) may be 0."""

    U: torch.Tensor  # (d, r)
    s: torch.Tensor  # (r,)
    Vh: torch.Tensor  # (r, k)

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def dense(self) -> torch.Tensor:
        return (self.U * self.s[None, :]) @ self.Vh  # (d, k)

    @classmethod
    def zeros(cls, d: int, k: int, device=None) -> "LowRank":
        return cls(torch.zeros(d, 0, device=device), torch.zeros(0, device=device), torch.zeros(0, k, device=device))


def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    """sign(x) · max(|x| − τ, 0), elementwise (the proximal operator of τ‖·‖₁)."""
    if tau < 0:
        raise ValueError(f"threshold must be >= 0, got {tau}")
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


def hard_threshold(x: torch.Tensor, keep: float) -> torch.Tensor:
    """`x` with all but its round(keep · numel) largest-magnitude entries zeroed: the projection onto
    matrices with at most that many non-zeros (the proximal map of that constraint's indicator)."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be a fraction in [0, 1], got {keep}")
    count = int(round(keep * x.numel()))
    if count >= x.numel():
        return x.clone()
    out = torch.zeros_like(x)
    if count > 0:
        index = torch.topk(x.abs().flatten(), count).indices
        out.view(-1)[index] = x.flatten()[index]
    return out


def randomized_svd(m: torch.Tensor, q: int, niter: int = 2, generator: torch.Generator | None = None,
                   oversample: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`q` singular triplets of `m` [d, k] by a seeded randomized range finder (Halko et al.).

    Deterministic for a given generator state, whatever the process: what makes distributed runs, where a
    matrix's owner draws the sketch, reproduce single-process runs exactly.

    Returns:
        U [d, q], s [q] (descending), Vh [q, k].
    """
    d, k = m.shape
    q = min(q, d, k)
    p = min(q + oversample, d, k)
    omega = torch.randn(k, p, generator=generator, dtype=m.dtype).to(m.device)  # (k, p)
    basis, _ = torch.linalg.qr(m @ omega)  # (d, p)
    for _ in range(niter):  # power iterations, re-orthonormalized each half step
        basis, _ = torch.linalg.qr(m.T @ basis)  # (k, p)
        basis, _ = torch.linalg.qr(m @ basis)  # (d, p)
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)  # (p, p), (p,), (p, k)
    return (basis @ u_small)[:, :q], s[:q], vh[:q]


def svd(m: torch.Tensor, method: str = "full", max_rank: int | None = None, niter: int = 2,
        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD: exact ("full") or the top `max_rank` triplets ("randomized")."""
    if method == "full":
        return torch.linalg.svd(m, full_matrices=False)
    if method == "randomized":
        if max_rank is None or max_rank < 1:
            raise ValueError(f"randomized SVD needs max_rank >= 1, got {max_rank}")
        return randomized_svd(m, max_rank, niter, generator)
    raise ValueError(f"svd method must be 'full' or 'randomized', got {method!r}")


def singular_value_threshold(m: torch.Tensor, tau: float, method: str = "full", max_rank: int | None = None,
                             niter: int = 2, generator: torch.Generator | None = None) -> LowRank:
    """SVT: U · diag(max(σ − τ, 0)) · Vᴴ, the proximal operator of τ‖·‖* (components at 0 dropped)."""
    if tau < 0:
        raise ValueError(f"threshold must be >= 0, got {tau}")
    u, s, vh = svd(m.float(), method, max_rank, niter, generator)
    s = torch.clamp(s - tau, min=0.0)
    r = int((s > 0).sum())  # s is descending, so the kept components are the first r
    return LowRank(u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous())


def effective_rank(s: torch.Tensor, energy: float = 0.999) -> int:
    """Smallest k whose top-k singular values hold `energy` of Σσ² (0 for an all-zero spectrum)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = torch.sort(s.detach().double().flatten() ** 2, descending=True).values
    total = float(sq.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(sq, 0)
    # relative slack: with energy = 1 rounding must not push the answer past the last non-zero value
    k = int(torch.searchsorted(cum, torch.tensor(energy * total * (1 - 1e-12), dtype=torch.float64))) + 1
    return min(k, int((sq > 0).sum()))


def density(s: torch.Tensor) -> float:
    """Fraction of non-zero entries."""
    return float(torch.count_nonzero(s)) / max(s.numel(), 1)


def penalty(x: torch.Tensor, low: torch.Tensor, sparse: torch.Tensor, dual: torch.Tensor, rho: float) -> torch.Tensor:
    """(ρ/2)‖X − L − S + Y/ρ‖²_F; its gradient in X is ρ(X − L − S) + Y."""
    return 0.5 * rho * (x - low - sparse + dual / rho).pow(2).sum()


def penalty_target(low: torch.Tensor, sparse: torch.Tensor, dual: torch.Tensor, rho: float) -> torch.Tensor:
    """T = L + S − Y/ρ, so that the penalty is (ρ/2)‖X − T‖² (cached between ADMM rounds)."""
    return low + sparse - dual / rho


@dataclass
class RoundResult:
    L: LowRank
    S: torch.Tensor
    Y: torch.Tensor
    effective_rank: int
    rank_ratio: float
    density: float
    residual: float  # ‖X − L − S‖_F after the round


@torch.no_grad()
def admm_round(x: torch.Tensor, sparse: torch.Tensor, dual: torch.Tensor, alpha: float, beta: float, rho: float,
               energy: float = 0.999, svd_method: str = "full", max_rank: int | None = None, niter: int = 2,
               generator: torch.Generator | None = None, update_dual: bool = True,
               keep: float | None = None) -> RoundResult:
    """One ADMM round (L, then S, then Y) for one matrix, in fp32.

    Args:
        x: the current weight X [d, k].
        sparse, dual: S and Y from the previous round.
        alpha, beta, rho: the nuclear-norm and ℓ1 weights and the penalty weight (thresholds α/ρ, β/ρ).
        update_dual: False skips the Y step (used to initialize L and S from X with Y = 0).
        keep: None: the S step soft-thresholds at β/ρ; a fraction: it keeps that fraction of entries
            (`hard_threshold`) and β is not used.
    """
    x = x.detach().float()
    low = singular_value_threshold(x - sparse + dual / rho, alpha / rho, svd_method, max_rank, niter, generator)
    low_dense = low.dense()
    residual = x - low_dense + dual / rho
    sparse = soft_threshold(residual, beta / rho) if keep is None else hard_threshold(residual, keep)
    gap = x - low_dense - sparse  # (d, k)
    if update_dual:
        dual = dual + rho * gap
    eff = effective_rank(low.s, energy)
    return RoundResult(low, sparse, dual, eff, eff / min(x.shape), density(sparse), float(gap.norm()))


def controller_step(value: float, rate: float, target: float, gain: float, previous_rate: float | None = None,
                    damping: float = 0.0) -> float:
    """Integral control of a threshold weight (α on the rank ratio, β on the density), in the log domain.

    log value ← log value + gain · (rate − target) + damping · max(0, rate − previous_rate)

    A rate above its target raises the threshold value/ρ (fewer singular values / entries survive the next
    round), one below lowers it. Integrating log α rather than α makes the step relative: the gains are
    dimensionless, the same for every matrix whatever its scale, and the threshold can shrink by orders of
    magnitude (as it must when training pulls X onto L + S) without ever crossing zero. The damping term
    is one-sided: it acts only while the rate is rising, braking an overshoot upward.
    """
    if value <= 0:
        raise ValueError(f"a threshold weight must stay positive, got {value}")
    step = gain * (rate - target)
    if damping and previous_rate is not None and math.isfinite(previous_rate):
        step += damping * max(0.0, rate - previous_rate)
    return value * math.exp(step)


def threshold_for_rank(s: torch.Tensor, keep: int) -> float:
    """A threshold τ under which SVT keeps exactly `keep` of the (descending) singular values `s`."""
    if keep >= s.numel():
        return 0.0
    return float(s[keep])


def threshold_for_density(m: torch.Tensor, target_density: float) -> float:
    """A threshold τ under which soft thresholding of `m` keeps (at most) the target fraction of entries."""
    keep = int(round(target_density * m.numel()))
    if keep >= m.numel():
        return 0.0
    return float(torch.topk(m.detach().abs().flatten(), keep + 1).values[-1])


def rms_scales(x: torch.Tensor) -> tuple[float, float]:
    """(RMS singular value ‖X‖_F/sqrt(min(d, k)), RMS entry ‖X‖_F/sqrt(d·k)) of X [d, k]."""
    fro = float(x.detach().float().norm())
    d, k = x.shape
    return fro / math.sqrt(min(d, k)), fro / math.sqrt(d * k)
