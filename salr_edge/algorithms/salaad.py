"""SALAAD orchestration: per-matrix ADMM state, the training hooks, and budgeted extraction.

Training (`train_salaad`) reuses `salr_edge.training.finetune` (AdamW, clipping, cosine schedule, gradient
accumulation, DDP, resume) through a `TrainingHooks` object, `SALAADTrainer`:

- the targeted dense weights X are the trainable parameters (everything else is frozen);
- every optimizer step adds Σ (ρ/2)‖X − L − S + Y/ρ‖² over the targeted matrices to the loss;
- every `admm_every` steps one ADMM round per matrix (`admm.admm_round`) updates L, S, Y, then the
  controller moves α and β toward the rank and density targets and the ρ schedule advances;
- per-matrix α, β, ρ, rank ratio, density and ‖X − L − S‖ go to a JSONL log, a summary to the progress bar.

Distributed (torchrun / DDP): matrix i is owned by rank i mod world_size. Only its owner holds its fp32
state (L, S, Y), runs its ADMM rounds and adds its penalty, multiplied by world_size: DDP averages
gradients over ranks, so the X gradient is then mean(∇ℓ) + ∇penalty, exactly the single-process gradient
of the same global batch. X itself is replicated by DDP, so no ADMM state is ever communicated during
training; checkpoints gather it to rank 0 (point-to-point, one matrix at a time).

Extraction (`extract_`): one factor f scales every matrix's trained rank (its effective rank) and its
number of S non-zeros; f is found by bisection so that the stored bytes (bitmap + fp16 values + int64 row
offsets + fp16 adapters) meet a budget. Each layer becomes a `SparseLowRankLinear` whose sparse base holds
the largest-magnitude entries of S and whose adapter "lowrank" holds the top singular components of L.
Above the trained structure (f > 1) the base keeps all of S and the largest entries of the trained
weights' residual X − L beside it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import nn

from ..api import register_handler, replace_module
from ..config import SALAADConfig
from ..formats.bitmap import stored_layer_bytes
from ..modules.sparse_lowrank_linear import SparseLowRankLinear, iter_sparse_lowrank
from ..targeting import find_target_linears
from ..training.finetune import FinetuneConfig, TrainingHooks, _world, finetune
from . import admm

logger = logging.getLogger(__name__)

LOWRANK_ADAPTER = "lowrank"
VALUE_BYTES = 2  # fp16 values and adapters, as stored and as budgets count them
FITS = ("none", "refit", "project")  # how `extract_` fits the kept parts to the trained weights

# The scalars of a matrix's state, in the order they are packed into one float64 tensor.
SCALAR_FIELDS = ("alpha", "beta", "rho", "rho0", "rounds", "rank_ratio", "effective_rank", "density", "residual",
                 "prev_rank_ratio", "prev_density", "sigma_scale", "entry_scale")
TENSOR_FIELDS = ("L_U", "L_s", "L_Vh", "S", "Y")


@dataclass
class MatrixState:
    """ADMM state of one targeted weight X [d, k]. Tensors live on the owner rank only (None elsewhere)."""

    name: str
    index: int
    shape: tuple[int, int]
    kind: str
    target_rank_ratio: float
    target_density: float
    owner: int = 0
    alpha: float = 0.0
    beta: float = 0.0
    rho: float = 0.0
    rho0: float = 0.0
    rounds: int = 0
    rank_ratio: float = float("nan")
    effective_rank: int = 0
    density: float = float("nan")
    residual: float = float("nan")
    prev_rank_ratio: float = float("nan")
    prev_density: float = float("nan")
    sigma_scale: float = 0.0
    entry_scale: float = 0.0
    L: admm.LowRank | None = None
    S: torch.Tensor | None = None
    Y: torch.Tensor | None = None
    target: torch.Tensor | None = field(default=None, repr=False)  # cached L + S − Y/ρ (never saved)

    @property
    def has_tensors(self) -> bool:
        return self.S is not None

    def scalars(self) -> dict[str, float]:
        return {f: float(getattr(self, f)) for f in SCALAR_FIELDS}

    def set_scalars(self, values: dict[str, float]) -> None:
        for f in SCALAR_FIELDS:
            value = float(values[f])
            setattr(self, f, int(value) if f in ("rounds", "effective_rank") else value)

    def scalar_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f) for f in SCALAR_FIELDS], dtype=torch.float64)

    def set_scalar_tensor(self, t: torch.Tensor) -> None:
        self.set_scalars(dict(zip(SCALAR_FIELDS, t.tolist())))

    def tensor_dict(self) -> dict[str, torch.Tensor]:
        assert self.L is not None and self.S is not None and self.Y is not None
        return {"L_U": self.L.U, "L_s": self.L.s, "L_Vh": self.L.Vh, "S": self.S, "Y": self.Y}

    def set_tensors(self, t: dict[str, torch.Tensor], device=None) -> None:
        d, k = self.shape
        u, s, vh, sp, y = (t[f].float().to(device) for f in TENSOR_FIELDS)
        r = s.numel()
        if u.shape != (d, r) or vh.shape != (r, k) or sp.shape != (d, k) or y.shape != (d, k):
            raise ValueError(f"{self.name}: SALAAD state tensors do not fit a {d}x{k} matrix")
        self.L, self.S, self.Y = admm.LowRank(u, s, vh), sp, y
        self.refresh_target()

    def refresh_target(self) -> None:
        assert self.L is not None and self.S is not None and self.Y is not None
        self.target = admm.penalty_target(self.L.dense(), self.S, self.Y, self.rho)

    def log_row(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "round": self.rounds, "alpha": self.alpha, "beta": self.beta,
                "rho": self.rho, "rank_ratio": self.rank_ratio, "effective_rank": self.effective_rank,
                "density": self.density, "residual": self.residual,
                "rel_residual": self.residual / (self.entry_scale * math.sqrt(self.shape[0] * self.shape[1]) or 1.0),
                "target_rank_ratio": self.target_rank_ratio, "target_density": self.target_density}


def base_rho(config: SALAADConfig, shape: tuple[int, int]) -> float:
    """ρ of a matrix at the start: `rho`, or rho / sqrt(d·k) for the "shape" schedule."""
    if config.rho_schedule == "shape":
        return config.rho / math.sqrt(shape[0] * shape[1])
    return config.rho


def scheduled_rho(config: SALAADConfig, state: MatrixState) -> float:
    """ρ after `state.rounds` ADMM rounds: constant, or the geometric ramp capped at `rho_max`."""
    if config.rho_schedule == "ramp":
        return min(state.rho0 * config.rho_growth ** state.rounds, config.rho_max)
    return state.rho0


def _generator(state: MatrixState) -> torch.Generator:
    # the same sketch whichever rank owns the matrix: distributed runs reproduce single-process ones
    return torch.Generator().manual_seed(1_000_003 * state.index + state.rounds)


def _svd_rank(config: SALAADConfig, shape: tuple[int, int]) -> int | None:
    return max(1, math.ceil(config.svd_rank_cap * min(shape))) if config.svd_method == "randomized" else None


def threshold_for_effective_rank(s: torch.Tensor, keep: int, energy: float) -> float:
    """The largest SVT threshold τ whose shrunk spectrum max(s − τ, 0) still has effective rank >= keep."""
    if keep <= 0 or s.numel() == 0:
        return float(s.max()) if s.numel() else 0.0
    if admm.effective_rank(s, energy) < keep:
        return 0.0
    lo, hi = 0.0, float(s[0])  # eff(lo) >= keep, eff(hi) = 0 < keep; eff(τ) does not increase with τ
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if admm.effective_rank(torch.clamp(s - mid, min=0.0), energy) >= keep:
            lo = mid
        else:
            hi = mid
    return lo


@torch.no_grad()
def initialize_state(config: SALAADConfig, state: MatrixState, weight: torch.Tensor) -> None:
    """Round 0: L and S from the initial X with Y = 0, at the thresholds `alpha0`/`beta0` (or the targets')."""
    x = weight.detach().float()
    d, k = state.shape
    state.sigma_scale, state.entry_scale = admm.rms_scales(x)
    state.rho0 = state.rho = base_rho(config, state.shape)
    u, s, vh = admm.svd(x, config.svd_method, _svd_rank(config, state.shape), config.svd_niter, _generator(state))
    if config.alpha0 is None:
        tau_l = threshold_for_effective_rank(s, math.ceil(state.target_rank_ratio * min(d, k)), config.energy)
    else:
        tau_l = config.alpha0 * state.sigma_scale
    shrunk = torch.clamp(s - tau_l, min=0.0)
    r = int((shrunk > 0).sum())
    low = admm.LowRank(u[:, :r].contiguous(), shrunk[:r].contiguous(), vh[:r].contiguous())
    rest = x - low.dense()
    tau_s = admm.threshold_for_density(rest, state.target_density) if config.beta0 is None \
        else config.beta0 * state.entry_scale
    sparse = admm.soft_threshold(rest, tau_s) if config.sparse_step == "soft" else \
        admm.hard_threshold(rest, state.target_density)
    state.L, state.S, state.Y = low, sparse, torch.zeros_like(x)
    # a zero threshold (a target of 1, or a degenerate matrix) would freeze the log-domain controller
    tau_l = max(tau_l, 1e-6 * state.sigma_scale, 1e-30)
    tau_s = max(tau_s, 1e-6 * state.entry_scale, 1e-30)
    state.alpha, state.beta = tau_l * state.rho, tau_s * state.rho
    state.effective_rank = admm.effective_rank(low.s, config.energy)
    state.rank_ratio = state.effective_rank / min(d, k)
    state.density = admm.density(sparse)
    state.residual = float((rest - sparse).norm())
    state.rounds = 0
    state.refresh_target()


@torch.no_grad()
def run_round(config: SALAADConfig, state: MatrixState, weight: torch.Tensor) -> None:
    """One ADMM round, then the controller and the ρ schedule (thresholds α/ρ, β/ρ kept across a ρ change)."""
    assert state.S is not None and state.Y is not None
    keep = state.target_density if config.sparse_step == "hard" else None
    result = admm.admm_round(weight, state.S, state.Y, state.alpha, state.beta, state.rho, config.energy,
                             config.svd_method, _svd_rank(config, state.shape), config.svd_niter, _generator(state),
                             keep=keep)
    state.L, state.S, state.Y = result.L, result.S, result.Y
    state.prev_rank_ratio, state.prev_density = state.rank_ratio, state.density
    state.rank_ratio, state.density = result.rank_ratio, result.density
    state.effective_rank, state.residual = result.effective_rank, result.residual
    state.rounds += 1
    damp = state.rounds > config.damping_after
    state.alpha = admm.controller_step(state.alpha, state.rank_ratio, state.target_rank_ratio, config.alpha_gain,
                                       state.prev_rank_ratio if damp else None, config.damping)
    state.beta = admm.controller_step(state.beta, state.density, state.target_density, config.beta_gain,
                                      state.prev_density if damp else None, config.damping)
    new_rho = scheduled_rho(config, state)
    if new_rho != state.rho:
        state.alpha *= new_rho / state.rho
        state.beta *= new_rho / state.rho
        state.rho = new_rho
    state.refresh_target()


class SALAADTrainer(TrainingHooks):
    """The `finetune` hooks of SALAAD: penalty, ADMM rounds, logging and state (see the module docstring).

    Args:
        model: the (unwrapped) causal LM being trained; its targeted linear weights are X.
        config: the SALAAD settings.
        log_path: JSONL file receiving one line per matrix and ADMM round (rank 0 writes it; appended).
    """

    def __init__(self, model: nn.Module, config: SALAADConfig, log_path: str | os.PathLike | None = None) -> None:
        if any(True for _ in iter_sparse_lowrank(model)):
            raise ValueError("SALAAD trains a dense model; this one already holds SparseLowRankLinear layers")
        self.model = model
        self.config = config
        self.rank, self.world = _world()
        names = find_target_linears(model, config.target_modules, config.exclude_modules)
        self.weights: dict[str, torch.Tensor] = {n: model.get_submodule(n).weight for n in names}
        self.states: dict[str, MatrixState] = {}
        for i, name in enumerate(names):
            kind, rank_ratio, dens = config.targets_for(name)
            shape = tuple(self.weights[name].shape)
            self.states[name] = MatrixState(name, i, shape, kind, rank_ratio, dens, owner=i % self.world)
        self.log_path = Path(log_path) if log_path is not None else None
        self.initialized = False
        self.summary: dict[str, str] = {}
        self.last_penalty = 0.0

    def owned(self) -> list[MatrixState]:
        return [s for s in self.states.values() if s.owner == self.rank]

    # ---- TrainingHooks ---------------------------------------------------------------------------
    def on_train_start(self, step: int) -> None:
        if not self.initialized:
            for state in self.owned():
                initialize_state(self.config, state, self.weights[state.name])
            self.initialized = True
            self._report(step)

    def extra_loss(self, step: int) -> torch.Tensor | None:
        terms = [0.5 * s.rho * (self.weights[s.name].float() - s.target).pow(2).sum() for s in self.owned()]
        if not terms:
            return None
        total = torch.stack(terms).sum()
        self.last_penalty = float(total.detach())
        return total * self.world  # DDP averages over ranks: the owner's share must count world times

    def on_step_end(self, step: int) -> dict[str, str]:
        if step % self.config.admm_every == 0:
            for state in self.owned():
                run_round(self.config, state, self.weights[state.name])
            self._report(step)
        return {**self.summary, "pen": f"{self.last_penalty:.2e}"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, state in self.gather_states().items():
            tensors[f"{name}.scalars"] = state.scalar_tensor()
            tensors.update({f"{name}.{k}": v.detach().cpu() for k, v in state.tensor_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        missing = [n for n in self.states if f"{n}.scalars" not in tensors]
        if missing:
            raise ValueError(f"the SALAAD trainer state does not cover the targeted layers (missing {missing[:3]})")
        for name, state in self.states.items():
            state.set_scalar_tensor(tensors[f"{name}.scalars"])
            if state.owner == self.rank:
                state.set_tensors({f: tensors[f"{name}.{f}"] for f in TENSOR_FIELDS}, self.weights[name].device)
        self.initialized = True

    # ---- distributed helpers ---------------------------------------------------------------------
    def _comm_device(self, name: str) -> torch.device:
        nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        return self.weights[name].device if nccl else torch.device("cpu")

    def gather_states(self) -> dict[str, MatrixState]:
        """Every matrix's full state on rank 0 ({} on the other ranks). A collective under DDP."""
        if self.world == 1:
            return dict(self.states)
        out: dict[str, MatrixState] = {}
        for name, state in self.states.items():
            if state.owner == 0:
                if self.rank == 0:
                    out[name] = state
                continue
            dev = self._comm_device(name)
            d, k = state.shape
            if self.rank == state.owner:
                dist.send(state.scalar_tensor().to(dev), dst=0)
                dist.send(torch.tensor([state.L.rank], dtype=torch.int64, device=dev), dst=0)
                for tensor in state.tensor_dict().values():
                    if tensor.numel():  # an L of rank 0 has empty factors: nothing to send
                        dist.send(tensor.detach().float().contiguous().to(dev), dst=0)
            elif self.rank == 0:
                scalars = torch.empty(len(SCALAR_FIELDS), dtype=torch.float64, device=dev)
                dist.recv(scalars, src=state.owner)
                r = torch.empty(1, dtype=torch.int64, device=dev)
                dist.recv(r, src=state.owner)
                r = int(r.item())
                shapes = {"L_U": (d, r), "L_s": (r,), "L_Vh": (r, k), "S": (d, k), "Y": (d, k)}
                received = {}
                for f in TENSOR_FIELDS:
                    buf = torch.empty(shapes[f], dtype=torch.float32, device=dev)
                    if buf.numel():
                        dist.recv(buf, src=state.owner)
                    received[f] = buf.cpu()
                copy = MatrixState(state.name, state.index, state.shape, state.kind, state.target_rank_ratio,
                                   state.target_density, owner=state.owner)
                copy.set_scalar_tensor(scalars.cpu())
                copy.set_tensors(received)
                out[name] = copy
        return out

    def _report(self, step: int) -> None:
        rows = [{"step": step, **s.log_row()} for s in self.owned()]
        if self.world > 1:
            gathered: list | None = [None] * self.world if self.rank == 0 else None
            dist.gather_object(rows, gathered, dst=0)
            if self.rank != 0:
                return
            rows = [r for part in gathered for r in part]
        rows.sort(key=lambda r: self.states[r["name"]].index)
        if not rows:
            return
        n = len(rows)
        self.summary = {"rank": f"{sum(r['rank_ratio'] for r in rows) / n:.3f}",
                        "dens": f"{sum(r['density'] for r in rows) / n:.3f}",
                        "gap": f"{max(r['rel_residual'] for r in rows):.1e}",
                        "rho": f"{sum(r['rho'] for r in rows) / n:.1e}"}
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                for row in rows:
                    f.write(json.dumps(row, sort_keys=True) + "\n")


def prepare_model(model: nn.Module, config: SALAADConfig) -> list[str]:
    """Freeze everything but the targeted linear weights (the X that SALAAD trains); returns their names."""
    names = find_target_linears(model, config.target_modules, config.exclude_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        model.get_submodule(name).weight.requires_grad_(True)
    return names


def train_salaad(model: nn.Module, tokens: torch.Tensor, config: SALAADConfig, train_config: FinetuneConfig,
                 log_path: str | os.PathLike | None = None,
                 show_progress: bool = True) -> tuple[list[dict], SALAADTrainer]:
    """Modifies `model` in place: SALAAD training of its targeted weights on a token stream.

    Works under torchrun (DDP) like `finetune`; then `save_salaad_checkpoint` must be called on every rank.

    Returns:
        (the `finetune` history, the trainer holding the ADMM state).
    """
    prepare_model(model, config)
    trainer = SALAADTrainer(model, config, log_path)
    history = finetune(model, tokens, train_config, show_progress=show_progress, hooks=trainer)
    return history, trainer


# ---- budgets and extraction ----------------------------------------------------------------------

Budget = Union[float, int, str]

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed budget: kind "fraction" (of the dense fp16 bytes of the targeted layers), "bytes" or "params"."""

    kind: str
    value: float


def parse_budget(budget: Budget) -> BudgetSpec:
    """Read a budget: a float in (0, 1) (fraction of dense fp16 bytes), an int (bytes), or a string.

    Strings: "0.4", "40%", "40MB", "38.1MiB", "40000000" (bytes), "20M params", "1.5e7params".
    """
    if isinstance(budget, bool):
        raise TypeError(f"budget must be a number or a string, got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 < budget < 1.0:
            raise ValueError(f"a float budget is a fraction of the dense fp16 bytes of the targeted layers, in "
                             f"(0, 1); got {budget} (give bytes as an int or a string such as '40MB')")
        return BudgetSpec("fraction", budget)
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"a byte budget must be positive, got {budget}")
        return BudgetSpec("bytes", float(budget))
    if not isinstance(budget, str):
        raise TypeError(f"budget must be a float, an int or a string, got {type(budget).__name__}")
    text = budget.strip()
    if m := re.fullmatch(_NUMBER + r"\s*%", text):
        return parse_budget(float(m.group(1)) / 100)
    if m := re.fullmatch(_NUMBER + r"\s*([kKmMgGbB]?)\s*(?:params?|parameters?)", text):
        count = float(m.group(1)) * _COUNT_UNITS[m.group(2).lower()]
        if count <= 0:
            raise ValueError(f"a parameter budget must be positive, got {budget!r}")
        return BudgetSpec("params", count)
    if m := re.fullmatch(_NUMBER + r"\s*([kKmMgG]?i?[bB])", text):
        unit = m.group(2).lower()
        if unit not in _BYTE_UNITS:
            raise ValueError(f"unknown byte unit in budget {budget!r}")
        return parse_budget(max(1, int(round(float(m.group(1)) * _BYTE_UNITS[unit]))))
    if re.fullmatch(_NUMBER, text):
        value = float(text)
        return parse_budget(value) if value < 1 else parse_budget(int(round(value)))
    raise ValueError(f"cannot read budget {budget!r}: use a fraction such as 0.4 or '40%', bytes such as "
                     f"'40MB' or 40000000, or parameters such as '20M params'")


def layer_bytes(d: int, k: int, nnz: int, rank: int) -> int:
    """Stored bytes of one layer: bitmap + fp16 values + int64 row offsets + fp16 adapters A [r, k], B [d, r]."""
    return stored_layer_bytes(d, k, nnz, rank, VALUE_BYTES, VALUE_BYTES)


def layer_params(d: int, k: int, nnz: int, rank: int) -> int:
    """Stored parameters of one layer: non-zeros of the sparse base + adapter entries."""
    return nnz + rank * (d + k)


@dataclass
class LayerSupply:
    """What a matrix's trained state offers: its trained rank and non-zeros (at f = 1) and their maxima."""

    shape: tuple[int, int]
    rank: int  # effective rank at the end of training
    max_rank: int  # singular components stored in L
    nnz: int  # non-zeros of S
    max_nnz: int | None = None  # entries a cut may keep: nnz (default), or d·k when the trained X can extend S

    @property
    def nnz_cap(self) -> int:
        return self.nnz if self.max_nnz is None else self.max_nnz

    def counts(self, factor: float) -> tuple[int, int]:
        return (min(self.max_rank, int(round(factor * self.rank))), min(self.nnz_cap, int(round(factor * self.nnz))))


@dataclass
class ExtractionPlan:
    factor: float
    counts: dict[str, tuple[int, int]]  # name -> (rank, nnz)
    bytes: int
    params: int
    dense_bytes: int
    budget: BudgetSpec | None
    target: float | None  # the budget in its unit (bytes or params); None: the trained structure (f = 1)

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "bytes": self.bytes, "params": self.params, "dense_fp16_bytes": self.dense_bytes,
                "fraction_of_dense": self.bytes / self.dense_bytes,
                "budget": None if self.budget is None else {"kind": self.budget.kind, "value": self.budget.value},
                "layers": {n: {"rank": r, "nnz": z} for n, (r, z) in self.counts.items()}}


def plan_extraction(supply: dict[str, LayerSupply], budget: Budget | None = None,
                    tolerance: float = 0.02) -> ExtractionPlan:
    """Find the factor f whose per-layer (rank, nnz) = f × trained values meets `budget` within `tolerance`.

    Bytes and parameters grow with f; the plan takes the largest f that stays within the budget (bisection),
    then spreads what rounding left below the budget as extra S entries (see `_fill`).

    Raises:
        ValueError: the budget is not above the structure's minimum (bitmaps and row offsets: about 1/16 of
            dense fp16), not below dense, or above what the trained L and S hold in full.
    """
    dense = sum(VALUE_BYTES * s.shape[0] * s.shape[1] for s in supply.values())
    total_entries = sum(s.shape[0] * s.shape[1] for s in supply.values())

    def measure(f: float) -> tuple[dict[str, tuple[int, int]], int, int]:
        counts = {n: s.counts(f) for n, s in supply.items()}
        nbytes = sum(layer_bytes(*s.shape, counts[n][1], counts[n][0]) for n, s in supply.items())
        params = sum(layer_params(*s.shape, counts[n][1], counts[n][0]) for n, s in supply.items())
        return counts, nbytes, params

    if budget is None:
        counts, nbytes, params = measure(1.0)
        return ExtractionPlan(1.0, counts, nbytes, params, dense, None, None)
    spec = budget if isinstance(budget, BudgetSpec) else parse_budget(budget)
    if spec.kind == "params":
        target, unit = spec.value, "parameters"
        if target >= total_entries:
            raise ValueError(f"budget of {target:.0f} parameters is not below the dense count of the targeted "
                             f"layers ({total_entries}); nothing to compress")
    else:
        target, unit = (spec.value * dense if spec.kind == "fraction" else spec.value), "bytes"
        if target >= dense:
            raise ValueError(f"budget of {target:.0f} bytes is not below the dense fp16 size of the targeted layers "
                             f"({dense} bytes)")
    pick = 2 if spec.kind == "params" else 1
    floor = measure(0.0)[pick]
    if target <= floor and spec.kind != "params":
        raise ValueError(f"budget of {target:.0f} bytes ({target / dense:.4f} of dense fp16) is below what the "
                         f"structure can express: the bitmaps and row offsets alone take {floor} bytes "
                         f"({floor / dense:.4f} of dense fp16; the bitmap costs 1/16)")
    # from f = hi on, every layer keeps all of L's stored components and all the entries it may keep
    hi = 1.0 + max([s.max_rank / s.rank for s in supply.values() if s.rank > 0] +
                   [s.nnz_cap / s.nnz for s in supply.values() if s.nnz > 0], default=0.0)
    full = measure(hi)[pick]
    if full < target * (1 - tolerance):
        raise ValueError(f"budget of {target:.0f} {unit} is above what this checkpoint's L and S hold in full "
                         f"({full} {unit}" + (f", {full / dense:.4f} of dense fp16" if pick == 1 else "") +
                         "); ask for less or train with larger targets")
    lo = 0.0
    if full <= target:
        lo = hi
    else:
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if measure(mid)[pick] <= target:
                lo = mid
            else:
                hi = mid
    counts, nbytes, params = measure(lo)
    left = target - (params if pick == 2 else nbytes)
    counts = _fill(supply, counts, int(left // (1 if pick == 2 else VALUE_BYTES)))
    nbytes = sum(layer_bytes(*s.shape, counts[n][1], counts[n][0]) for n, s in supply.items())
    params = sum(layer_params(*s.shape, counts[n][1], counts[n][0]) for n, s in supply.items())
    got = params if pick == 2 else nbytes
    if abs(got - target) > tolerance * target:
        raise ValueError(f"no scaling of the trained structure lands within {tolerance:.0%} of {target:.0f} {unit} "
                         f"(closest below: {got})")
    return ExtractionPlan(lo, counts, nbytes, params, dense, spec, target)


def _fill(supply: dict[str, LayerSupply], counts: dict[str, tuple[int, int]], extra: int) -> dict[str, tuple[int, int]]:
    """Rounding correction: spread `extra` more S entries (the finest unit: one value) over the layers in
    proportion to their trained non-zeros, within what each layer may keep, so the plan lands on the budget even
    where the factor's rounding makes coarse steps (small models, many identical layers)."""
    counts = dict(counts)
    room = {n: supply[n].nnz_cap - counts[n][1] for n in counts}
    total = sum(supply[n].nnz for n in counts if room[n] > 0)
    if extra <= 0 or total == 0:
        return counts
    left = extra
    for n in counts:
        add = min(room[n], extra * supply[n].nnz // total) if room[n] > 0 else 0
        counts[n] = (counts[n][0], counts[n][1] + add)
        room[n] -= add
        left -= add
    for n in counts:  # what integer division left over, first come first served
        add = min(room[n], left)
        counts[n] = (counts[n][0], counts[n][1] + add)
        left -= add
    return counts


def _round_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def refit_to(x: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, mask: torch.Tensor,
             iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares magnitudes on a fixed structure: min ‖X − U·diag(c)·Vh − S‖ over c and S supported on `mask`.

    Alternates c = diag(Uᵀ(X − S)Vhᵀ) (exact for orthonormal U, Vh given S) and S = (X − U·diag(c)·Vh)⊙mask
    (exact given c); each step lowers the error. Undoes the shrinkage that the proximal steps leave in L and
    S when training stopped before X reached L + S.

    Returns:
        c [r] and S [d, k].
    """
    x = x.float()
    sparse = torch.zeros_like(x)
    c = torch.zeros(u.shape[1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        c = ((u.T @ (x - sparse)) * vh).sum(dim=1)  # (r,)
        sparse = (x - (u * c[None, :]) @ vh) * mask
    return c, sparse


def _cut_sparse(sparse: torch.Tensor, residual: torch.Tensor, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse base of a cut keeping `nnz` entries: (mask, values), both [d, k].

    Up to S's own non-zeros, its `nnz` largest-magnitude entries. Beyond them (a budget above the trained
    structure) all of S, then the largest entries of `residual` = X − L_cut off S's support, at their
    residual values. Where training reached X = L + S these are zeros; where it did not, X is what the
    model was trained to compute, and the residual's largest entries are what the kept L and S miss most.
    """
    flat = sparse.flatten()
    support = flat != 0
    held = int(support.sum())
    mask = torch.zeros_like(support)
    if nnz <= held:
        if nnz:
            mask[torch.topk(flat.abs(), nnz).indices] = True
        values = flat * mask
    else:
        score = residual.flatten().abs().masked_fill(support, -1.0)  # below every off-support entry's score
        mask[torch.topk(score, nnz - held).indices] = True
        values = torch.where(support, flat, residual.flatten() * mask)
        mask |= support
    return mask.reshape(sparse.shape), values.reshape(sparse.shape)


def _largest(m: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
    if count:
        mask[torch.topk(m.abs().flatten(), count).indices] = True
    return mask.reshape(m.shape)


def project_to(x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, nnz: int,
               iterations: int = 4, tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The closest L + S to X with L of rank r = len(sigma) and S of `nnz` non-zeros, by alternating projections.

    Starts from the cut L = U·diag(σ)·Vh and alternates S = the `nnz` largest entries of X − L (exact given L)
    and L = the rank-r truncated SVD of X − S (S holding X − L on its support: one hard-impute step of the
    masked low-rank fit), so ‖X − L − S‖ never rises above that of the cut's own L with its best S.

    This is the L/S half of an ADMM round solved to convergence for the final X, with each matrix's rank and
    non-zeros fixed by the budget: the counts (the learned cross-layer allocation, scaled) stay SALAAD's, the
    kept entries and directions are re-chosen for the weights training ended at. Stops after `iterations` or
    once an iteration lowers the error by less than `tol` (relative). Full SVDs: ~0.1-0.3 s a matrix of
    SmolLM2-135M per iteration on 2 cores, ~2 minutes for its 210 matrices.

    Returns:
        U [d, r], σ [r], Vh [r, k] and the mask [d, k] of S; S = (X − U·diag(σ)·Vh) ⊙ mask.
    """
    x = x.float()
    r = int(sigma.numel())
    low = (u * sigma[None, :]) @ vh if r else torch.zeros_like(x)
    previous = math.inf
    for _ in range(max(1, iterations)):
        mask = _largest(x - low, nnz)
        if r == 0:
            break
        u, sigma, vh = torch.linalg.svd(torch.where(mask, low, x), full_matrices=False)  # X − S
        u, sigma, vh = u[:, :r], sigma[:r], vh[:r]
        low = (u * sigma[None, :]) @ vh
        error = float(torch.where(mask, 0.0, x - low).norm())
        if error > previous * (1 - tol):
            break
        previous = error
    mask = _largest(x - low, nnz)  # the S that matches the last L
    return u, sigma, vh, mask


def projection_error(x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor,
                     mask: torch.Tensor) -> float:
    """‖X − L − S‖ for L = U·diag(σ)·Vh and S = (X − L) ⊙ mask: the part of X − L that S does not hold."""
    return float(torch.where(mask, 0.0, x.float() - (u * sigma[None, :]) @ vh).norm())


def project_best(x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor,
                 nnz: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`project_to` from two starts, the cut L and L = 0, keeping the one with the lower ‖X − L − S‖.

    Alternating projections find a local optimum, and which start reaches the better one depends on the
    matrix and the budget. From L = 0 the first step is magnitude pruning of X plus the SVD of the residual,
    so the result is never worse (in this error) than that baseline at the same counts. On SmolLM2-135M
    (BENCHMARKS §6) neither start gave the lower perplexity at every budget. The choice uses only the
    projection's own objective, per matrix.
    """
    from_cut = project_to(x, u, sigma, vh, nnz)
    from_zero = project_to(x, u, torch.zeros_like(sigma), vh, nnz)
    return min((from_cut, from_zero), key=lambda r: projection_error(x, *r))


@torch.no_grad()
def extract_(model: nn.Module, states: dict[str, MatrixState], budget: Budget | None = None,
             config: SALAADConfig | None = None, round_fp16: bool = True,
             fit: str = "none") -> tuple[nn.Module, ExtractionPlan]:
    """Modifies `model` in place: replace each targeted linear by a `SparseLowRankLinear` cut to `budget`.

    The sparse base keeps the `nnz` largest-magnitude entries of S; the adapter "lowrank" (scaling 1) keeps
    the top `rank` singular components of L, split as A = √σ·Vᴴ, B = U·√σ. Biases are kept. A budget above
    the trained structure keeps all of L and S and adds the largest entries of X − L (`_cut_sparse`), so one
    checkpoint serves budgets on both sides of the structure training aimed at.

    Args:
        states: every targeted matrix's full state (from `load_salaad_checkpoint` or `gather_states`).
        budget: see `parse_budget`; None keeps the trained structure (f = 1).
        round_fp16: round the kept values and adapters through fp16, so the model in memory computes what a
            checkpoint saved with fp16 values/adapters (the size the budget counts) computes.
        fit: how the kept parts are fitted to the trained weights X in the model. "none" (the method as
            published): L and S as they are. "refit": the structure ADMM chose (L's top singular directions,
            S's largest entries) with singular values and S's values re-fit by least squares (`refit_to`).
            "project": each matrix's rank and non-zeros as the plan gives them, the directions and entries
            re-chosen by alternating projections onto X from the cut and from zero (`project_best`). The last
            two matter where training stopped before X reached L + S.

    Returns:
        (the model, the extraction plan: factor, per-layer rank/nnz, bytes, parameters).
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    supply = {}
    for name, st in states.items():
        if not st.has_tensors:
            raise ValueError(f"{name}: no SALAAD state tensors (gather the state to this rank first)")
        supply[name] = LayerSupply(st.shape, min(st.effective_rank, st.L.rank), st.L.rank,
                                   int(torch.count_nonzero(st.S)), max_nnz=st.shape[0] * st.shape[1])
    plan = plan_extraction(supply, budget)
    extended = 0
    for name, (rank, nnz) in plan.counts.items():
        st = states[name]
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != st.shape:
            raise ValueError(f"{name}: expected an nn.Linear of shape {st.shape} in the model")
        x = linear.weight.detach().float().to(st.S.device)
        u, sigma, vh = st.L.U[:, :rank], st.L.s[:rank], st.L.Vh[:rank]
        mask, values = _cut_sparse(st.S, x - (u * sigma[None, :]) @ vh, nnz)
        extended += int(nnz > int(torch.count_nonzero(st.S)))
        if fit == "refit":
            sigma, base = refit_to(x, u, vh, mask)
        elif fit == "project":
            u, sigma, vh, mask = project_best(x, u, sigma, vh, nnz)
            base = (x - (u * sigma[None, :]) @ vh) * mask
        else:
            base = values
        if round_fp16:
            base = _round_fp16(base)
        linear.weight.copy_(base.to(linear.weight.device, linear.weight.dtype))
        module = SparseLowRankLinear(linear, mask.to(linear.weight.device))
        if rank:
            root = sigma.abs().sqrt()  # a refit value may come out negative: its sign goes into A
            a = (root * torch.sign(sigma))[:, None] * vh  # (r, k)
            b = u * root[None, :]  # (d, r)
            if round_fp16:
                a, b = _round_fp16(a), _round_fp16(b)
            module.add_adapter(LOWRANK_ADAPTER, a, b, scaling=1.0, trainable=True)
        replace_module(model, name, module)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in iter_sparse_lowrank(model):
        for adapter in module.adapter_names:
            module.set_adapter_trainable(adapter, True)
    model.salr_metadata = {"method": "salaad", "config": {"salaad": config.to_dict() if config else None,
                                                         "extraction": {**plan.to_dict(), "fit": fit}}}
    logger.info("SALAAD extraction: factor %.4f, %d bytes (%.4f of dense fp16)", plan.factor, plan.bytes,
                plan.bytes / plan.dense_bytes)
    if extended:
        logger.info("the budget lies above the trained structure: %d of %d layers keep all of S plus the largest "
                    "entries of the trained weights' residual X − L", extended, len(plan.counts))
    return model, plan


@register_handler(SALAADConfig)
def compress_salaad_(model: nn.Module, config: SALAADConfig, train_data: torch.Tensor | None = None,
                     train_config: FinetuneConfig | None = None, budget: Budget | None = None,
                     log_path: str | os.PathLike | None = None, show_progress: bool = True) -> nn.Module:
    """Modifies `model` in place: SALAAD training on `train_data` (1-D token ids), then extraction at `budget`.

    Single process; for torchrun use `train_salaad` + `salr_edge.salaad.save_salaad_checkpoint` + `extract`.
    """
    if train_data is None:
        raise ValueError("SALAAD needs train_data (1-D token ids, e.g. from salr_edge.data.load_token_stream)")
    if _world()[1] > 1:
        raise ValueError("compress_ with SALAADConfig runs in one process; under torchrun use "
                         "salr_edge.salaad (train_salaad, save_salaad_checkpoint, extract)")
    _, trainer = train_salaad(model, train_data, config, train_config or FinetuneConfig(), log_path, show_progress)
    extract_(model, trainer.gather_states(), budget, config)
    return model
