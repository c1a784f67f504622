"""Typed, validated, JSON-round-trippable configs for the compression methods."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

PRUNING_METHODS = ("magnitude", "wanda")
SVD_METHODS = ("full", "randomized")
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
    version: int = 1

    VERSION: ClassVar[int] = 1

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
        kind, n, m = parse_granularity(self.granularity)
        if kind == "nm" and abs(self.sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"granularity {self.granularity} fixes sparsity at {1 - n / m}, got sparsity={self.sparsity}")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        if self.target_modules is None:
            raise ValueError("target_modules must name at least one module pattern")
        if self.version != self.VERSION:
            raise ValueError(f"SALRConfig version {self.version} is not supported (this library reads {self.VERSION})")
