"""Typed, validated, JSON-round-trippable configs for the compression methods."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

PRUNING_METHODS = ("magnitude", "wanda")
SVD_METHODS = ("full", "randomized")
# How the kept base values are stored, and the bits of each integer kind (bitmap format version 2).
VALUE_FORMATS = ("float", "int8", "int4")
VALUE_BITS: dict[str, int | None] = {"float": None, "int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 32
_NM_RE = re.compile(r"^(\d+):(\d+)$")

TargetSpec = Union[str, list[str], None]


def parse_granularity(granularity: str) -> tuple[str, int, int]:
    """Split a granularity into (kind, n, m): ("matrix", 0, 0), ("row", 0, 0) or ("nm", n, m).

    Raises:
        ValueError: unknown granularity.
    """
    if granularity in ("matrix", "row"):
        return granularity, 0, 0
    match = _NM_RE.match(granularity)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 0 < n < m:
            return "nm", n, m
    raise ValueError(f"granularity must be 'matrix', 'row' or 'N:M' with 0 < N < M (e.g. '2:4'), got {granularity!r}")


class _ConfigMixin:
    """to_dict/from_dict/JSON for config dataclasses; unknown keys are an error."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["config_type"] = type(self).__name__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        kind = data.pop("config_type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"config_type {kind!r} cannot be read as {cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _check_targets(name: str, value: TargetSpec) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string")
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{name} must be a regex string, a list of module names, or None; got {value!r}")


@dataclass
class SALRConfig(_ConfigMixin):
    """SALR: prune the frozen base, recover the residual with a truncated SVD adapter, add LoRA.

    Args:
        sparsity: fraction of each targeted weight set to zero, in [0, 1). For N:M granularity it must
            equal 1 - N/M.
        rank: rank of the SVD residual adapter (0: none).
        lora_rank: rank of the trainable LoRA adapter (0: none).
        lora_alpha: LoRA scaling numerator (scaling = lora_alpha / lora_rank).
        pruning: "magnitude" (|W|) or "wanda" (|W| * ||x||, needs calibration data).
        granularity: where the sparsity budget applies: "matrix", "row" (per output row) or "N:M".
        target_modules: PEFT-style: a full-match regex, a list of names/suffixes, or "all-linear".
        exclude_modules: same semantics, removed from the matches.
        svd_method: "full" (exact) or "randomized" (`torch.svd_lowrank`, for big matrices).
        svd_niter: power iterations of the randomized SVD.
        train_residual: whether the SVD residual adapter is fine-tuned with LoRA or stays frozen.
        values: how the kept base values are stored: "float" (bitmap format v1), or "int8"/"int4"
            (v2: symmetric integers with one float16 scale per `group_size` values). Quantized values are
            quantized right after pruning and the SVD residual adapter is built from W − Q(prune(W)), so it
            absorbs the pruning and the quantization error together.
        group_size: kept values per scale (>= 1; only used with integer values).
    """

    sparsity: float = 0.5
    rank: int = 64
    lora_rank: int = 16
    lora_alpha: float = 16.0
    pruning: str = "magnitude"
    granularity: str = "matrix"
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec = None
    svd_method: str = "full"
    svd_niter: int = 4
    train_residual: bool = True
    values: str = "float"
    group_size: int = DEFAULT_GROUP_SIZE
    version: int = 1

    VERSION: ClassVar[int] = 1

    @property
    def bits(self) -> int | None:
        """Bits of the stored base values (8 or 4), None for float values."""
        return VALUE_BITS[self.values]

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"sparsity must be a number, got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("rank", "lora_rank", "svd_niter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.pruning not in PRUNING_METHODS:
            raise ValueError(f"pruning must be one of {PRUNING_METHODS}, got {self.pruning!r}")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.values not in VALUE_FORMATS:
            raise ValueError(f"values must be one of {VALUE_FORMATS}, got {self.values!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {self.group_size!r}")
        kind, n, m = parse_granularity(self.granularity)
        if kind == "nm" and abs(self.sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"granularity {self.granularity} fixes sparsity at {1 - n / m}, got sparsity={self.sparsity}")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        if self.target_modules is None:
            raise ValueError("target_modules must name at least one module pattern")
        if self.version != self.VERSION:
            raise ValueError(f"SALRConfig version {self.version} is not supported (this library reads {self.VERSION})")


RHO_SCHEDULES = ("fixed", "shape", "ramp")
# S step of an ADMM round: soft thresholding (the method) or the projection onto a fixed density
SPARSE_STEPS = ("soft", "hard")


def _check_fraction(name: str, value: Any, optional: bool = False) -> None:
    """`value` must be a number in (0, 1] (or None when `optional`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclass
class SALAADConfig(_ConfigMixin):
    """SALAAD: train each targeted weight X densely while ADMM keeps it near L + S (L low-rank, S sparse).

    The problem is min ℓ(X) + α‖L‖* + β‖S‖₁ s.t. X = L + S. Every optimizer step adds the penalty
    (ρ/2)‖X − L − S + Y/ρ‖² to the loss; every `admm_every` steps one ADMM round updates L (singular-value
    thresholding at α/ρ), S (soft thresholding at β/ρ) and the dual Y, and an integral controller moves α
    and β so that each matrix's effective rank ratio and the density of its S approach their targets.

    Args:
        target_rank_ratio: effective rank of L (smallest k holding `energy` of its spectrum's energy)
            over min(d, k), in (0, 1].
        target_density: fraction of non-zero entries of S, in (0, 1].
        target_rank_ratio_attn, target_rank_ratio_mlp, target_density_attn, target_density_mlp:
            overrides for attention projections (module names containing "attn"/"attention") and MLP
            projections ("mlp"/"feed_forward"/"ffn"); None uses the general target.
        admm_every: optimizer steps between ADMM rounds (K).
        rho: penalty weight ρ (its starting value for "ramp").
        rho_schedule: "fixed" (ρ = rho); "shape" (ρ = rho / sqrt(d·k) per matrix: a big matrix's
            penalty, a sum over d·k entries, is not allowed to outweigh a small one's by its size alone);
            "ramp" (ρ multiplied by `rho_growth` after every ADMM round, capped at `rho_max`, so X is
            pulled onto L + S ever harder as training ends). A change of ρ keeps the thresholds α/ρ and
            β/ρ as they were (α and β are rescaled with it).
        rho_growth, rho_max: the ramp's factor per round (>= 1) and cap (>= rho).
        alpha0, beta0: initial thresholds α/ρ and β/ρ relative to the matrix's RMS singular value
            ‖X‖_F/sqrt(min(d, k)) and RMS entry ‖X‖_F/sqrt(d·k) (> 0); None (default) starts at the
            thresholds that give exactly the target rank and density on the initial weights.
        alpha_gain, beta_gain: integral gains of the log-domain controller (dimensionless): after each
            round α ← α · exp(alpha_gain · (rank ratio − target)), β ← β · exp(beta_gain · (density − target)).
        damping, damping_after: one-sided damping after ADMM round `damping_after`: when the rank ratio
            (density) rose since the previous round, log α (log β) also grows by damping · rise, which
            brakes an overshoot upward without slowing the way down (0: off).
        svd_method: "full" (exact SVD) or "randomized" (seeded, deterministic range finder keeping the
            top ceil(svd_rank_cap · min(d, k)) singular triplets, `svd_niter` power iterations).
        svd_rank_cap: fraction of min(d, k) computed by the randomized SVD; must cover the rank targets.
        energy: energy fraction that defines the effective rank (0.999: 99.9% of Σσ²).
        sparse_step: "soft" (the method: S ← soft thresholding at β/ρ, β steered to the target density) or
            "hard" (S ← the target density's largest-magnitude entries of X − L + Y/ρ, unshrunk: the
            projection onto "at most that many non-zeros", so S's support is a magnitude support and the
            density is exact every round; β then plays no part).
        target_modules, exclude_modules: PEFT-style targeting, as in `SALRConfig`.
    """

    target_rank_ratio: float = 0.25
    target_density: float = 0.3
    target_rank_ratio_attn: float | None = None
    target_rank_ratio_mlp: float | None = None
    target_density_attn: float | None = None
    target_density_mlp: float | None = None
    admm_every: int = 10
    rho: float = 1e-2
    rho_schedule: str = "ramp"
    rho_growth: float = 1.05
    rho_max: float = 1.0
    alpha0: float | None = None
    beta0: float | None = None
    alpha_gain: float = 2.0
    beta_gain: float = 2.0
    damping: float = 0.0
    damping_after: int = 0
    svd_method: str = "full"
    svd_rank_cap: float = 0.5
    svd_niter: int = 2
    energy: float = 0.999
    sparse_step: str = "soft"
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec = None
    version: int = 1

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.sparse_step not in SPARSE_STEPS:
            raise ValueError(f"sparse_step must be one of {SPARSE_STEPS}, got {self.sparse_step!r}")
        for name in ("target_rank_ratio", "target_density", "energy", "svd_rank_cap"):
            _check_fraction(name, getattr(self, name))
        for name in ("target_rank_ratio_attn", "target_rank_ratio_mlp", "target_density_attn", "target_density_mlp"):
            _check_fraction(name, getattr(self, name), optional=True)
        for name in ("admm_every", "damping_after", "svd_niter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "admm_every" else 0):
                bound = "a positive" if name == "admm_every" else "a non-negative"
                raise ValueError(f"{name} must be {bound} integer, got {value!r}")
        for name in ("rho", "rho_growth", "rho_max", "alpha_gain", "beta_gain", "damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not self.rho > 0:
            raise ValueError(f"rho must be positive, got {self.rho}")
        if self.rho_schedule not in RHO_SCHEDULES:
            raise ValueError(f"rho_schedule must be one of {RHO_SCHEDULES}, got {self.rho_schedule!r}")
        if self.rho_growth < 1.0:
            raise ValueError(f"rho_growth must be >= 1, got {self.rho_growth}")
        if self.rho_schedule == "ramp" and self.rho_max < self.rho:
            raise ValueError(f"rho_max must be >= rho ({self.rho}), got {self.rho_max}")
        for name in ("alpha_gain", "beta_gain", "damping"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("alpha0", "beta0"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be None (auto) or a positive number, got {value!r}")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.svd_method == "randomized":
            ranks = [self.target_rank_ratio, self.target_rank_ratio_attn, self.target_rank_ratio_mlp]
            top = max(r for r in ranks if r is not None)
            if self.svd_rank_cap < top:
                raise ValueError(f"svd_rank_cap={self.svd_rank_cap} is below the largest rank target {top}: "
                                 f"the randomized SVD could never reach it")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        if self.target_modules is None:
            raise ValueError("target_modules must name at least one module pattern")
        if self.version != self.VERSION:
            raise ValueError(f"SALAADConfig version {self.version} is not supported "
                             f"(this library reads {self.VERSION})")

    def targets_for(self, name: str) -> tuple[str, float, float]:
        """(kind, target rank ratio, target density) of the module `name`; kind is "attn", "mlp" or "other"."""
        kind = module_kind(name)
        rank = getattr(self, f"target_rank_ratio_{kind}", None) if kind != "other" else None
        density = getattr(self, f"target_density_{kind}", None) if kind != "other" else None
        return (kind, float(self.target_rank_ratio if rank is None else rank),
                float(self.target_density if density is None else density))


_ATTN_RE = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)(\.|$)")
_MLP_RE = re.compile(r"(^|\.)(mlp|feed_forward|ffn)(\.|$)")


def module_kind(name: str) -> str:
    """"attn" for attention projections, "mlp" for MLP projections, else "other" (by module-name parts)."""
    if _ATTN_RE.search(name):
        return "attn"
    if _MLP_RE.search(name):
        return "mlp"
    return "other"
