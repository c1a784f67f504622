"""Fine-tune the adapters of a compressed model; the sparse base stays frozen and exactly sparse.

AdamW + cosine schedule with warm-up (transformers' scheduler), gradient accumulation, gradient
clipping, periodic checkpoints with resume. Under `torchrun` (or accelerate) with an initialized
process group, the model is wrapped in DDP and every rank draws its own share of each global batch.
Batches are a pure function of (seed, step), so a resumed run sees the same data as an
uninterrupted one and needs no saved RNG state. A `TrainingHooks` object lets a method (SALAAD) add a
loss term, act after each optimizer step and keep its own state in the trainer checkpoints, without a
second training loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..io_utils import atomic_directory
from ..modules.sparse_lowrank_linear import iter_sparse_lowrank

logger = logging.getLogger(__name__)

STATE_DIR = "trainer_state"


@dataclass
class FinetuneConfig:
    """Settings of an adapter fine-tuning run.

    Args:
        steps: optimizer steps.
        batch_size: sequences per micro-batch per process.
        grad_accum: micro-batches per optimizer step.
        seq_len: tokens per sequence.
        lr: peak learning rate; warmup_steps: linear warm-up before the cosine decay.
        max_minutes: stop early (after a checkpoint) when the wall clock exceeds this; None = no limit.
        save_every: checkpoint every this many steps into `output_dir/trainer_state` (0 = only at end).
    """

    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    max_minutes: float | None = None
    output_dir: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.save_every and not self.output_dir:
            raise ValueError("save_every needs output_dir")
        if self.resume and not self.output_dir:
            raise ValueError("resume needs output_dir")


class TrainingHooks:
    """Extension points of `finetune`; the base class does nothing. Every method runs on every rank.

    - `on_train_start(step)`: after the optimizer exists and a resumed state is loaded, before step `step`.
    - `extra_loss(step)`: a scalar added to the last micro-batch's loss of each optimizer step (not
      divided by `grad_accum`), or None. Under DDP it is backpropagated with the model loss, so its
      gradient is averaged over ranks like the rest.
    - `on_step_end(step)`: after optimizer and scheduler stepped (`step` counts the steps done); returns
      entries for the progress bar.
    - `state_tensors()`: the hook's state at a checkpoint (a collective under DDP: rank 0's return value
      is what is saved), and `load_state_tensors(tensors)` to restore it on resume.
    """

    def on_train_start(self, step: int) -> None:
        pass

    def extra_loss(self, step: int) -> torch.Tensor | None:
        return None

    def on_step_end(self, step: int) -> dict[str, str]:
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


HOOKS_STATE = "hooks.safetensors"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_for_step(tokens: torch.Tensor, step: int, micro: int, cfg: FinetuneConfig, rank: int, world: int) -> torch.Tensor:
    """This rank's share [batch_size, seq_len] of the global micro-batch `micro` of `step`."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
    starts = torch.randint(0, tokens.numel() - cfg.seq_len, (cfg.batch_size * world,), generator=g)
    mine = starts[rank * cfg.batch_size:(rank + 1) * cfg.batch_size].tolist()
    return torch.stack([tokens[s:s + cfg.seq_len] for s in mine])


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _base_fingerprint(model: nn.Module) -> dict[str, tuple[float, int]]:
    return {name: (float(m.base_layer.weight.double().abs().sum()), int((m.base_layer.weight != 0).sum()))
            for name, m in iter_sparse_lowrank(model)}


def check_base_intact(model: nn.Module) -> None:
    """Raise if a base weight has an entry outside its mask (i.e. stopped being exactly sparse)."""
    for name, module in iter_sparse_lowrank(model):
        if bool((module.base_layer.weight.detach()[~module.salr_mask] != 0).any()):
            raise RuntimeError(f"{name}: the base weight has non-zeros outside its sparsity mask")


def _save_state(directory: Path, model: nn.Module, optimizer, scheduler, step: int, history: list,
                hook_tensors: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_directory(directory / STATE_DIR) as tmp:
        save_file({n: p.detach().contiguous() for n, p in trainable_parameters(model).items()},
                  str(tmp / "adapters.safetensors"))
        if hook_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in hook_tensors.items()}, str(tmp / HOOKS_STATE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}, indent=1))


def _load_state(directory: Path, model: nn.Module, optimizer, scheduler,
                hooks: TrainingHooks | None = None) -> tuple[int, list]:
    from safetensors.torch import load_file

    state_dir = directory / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise FileNotFoundError(f"no trainer state to resume from in {state_dir}")
    params = trainable_parameters(model)
    saved = load_file(str(state_dir / "adapters.safetensors"))
    if set(saved) != set(params):
        raise ValueError(f"trainer state in {state_dir} does not match this model's adapters")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    if hooks is not None:
        hooks_path = state_dir / HOOKS_STATE
        hooks.load_state_tensors(load_file(str(hooks_path)) if hooks_path.is_file() else {})
    optim = torch.load(state_dir / "optim.pt", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    state = json.loads((state_dir / "state.json").read_text())
    return int(state["step"]), list(state["history"])


def finetune(model: nn.Module, tokens: torch.Tensor, cfg: FinetuneConfig, show_progress: bool = True,
             hooks: TrainingHooks | None = None) -> list[dict]:
    """Modifies `model` in place: train its trainable parameters (the adapters) on a token stream.

    Args:
        model: a compressed causal LM (only adapters require grad; SALAAD makes dense weights trainable).
        tokens: 1-D token ids (see `salr_edge.data.load_token_stream`).
        hooks: extension points (see `TrainingHooks`), e.g. SALAAD's ADMM penalty and rounds.

    Returns:
        The history: one dict per logged step (step, loss, lr, elapsed seconds).
    """
    from transformers import get_cosine_schedule_with_warmup

    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters: compress it with adapters (rank or lora_rank > 0)")
    if tokens.numel() <= cfg.seq_len:
        raise ValueError(f"the training data has {tokens.numel()} tokens, fewer than seq_len={cfg.seq_len} + 1")
    rank, world = _world()
    fingerprint = _base_fingerprint(model)
    model.train()
    runner: nn.Module = model
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if out_dir is not None and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # now, not when the first state is saved minutes later
    step, history = 0, []
    if cfg.resume and out_dir is not None:
        step, history = _load_state(out_dir, model, optimizer, scheduler, hooks)
        logger.info("resumed from step %d", step)
    if hooks is not None:
        hooks.on_train_start(step)
    device = next(model.parameters()).device
    start = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", disable=not show_progress or rank != 0)
    while step < cfg.steps:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = batch_for_step(tokens, step, micro, cfg, rank, world).to(device)  # (B, T)
            loss = runner(input_ids=batch, labels=batch).loss / cfg.grad_accum
            total += float(loss.detach())
            extra = hooks.extra_loss(step) if hooks is not None and micro == cfg.grad_accum - 1 else None
            (loss if extra is None else loss + extra).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        postfix = hooks.on_step_end(step) if hooks is not None else {}
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}", **postfix)
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {step}; lower the learning rate")
        elapsed = time.monotonic() - start
        if step % cfg.log_every == 0 or step == cfg.steps:
            history.append({"step": step, "loss": total, "lr": scheduler.get_last_lr()[0], "seconds": elapsed})
            logger.info("step %d loss %.4f", step, total)
        out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
        if cfg.max_minutes is not None and world > 1:  # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)], device=device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if out_dir is not None and ((cfg.save_every and step % cfg.save_every == 0) or out_of_time):
            hook_tensors = hooks.state_tensors() if hooks is not None else None  # collective under DDP
            if rank == 0:
                _save_state(out_dir, model, optimizer, scheduler, step, history, hook_tensors)
        if out_of_time:
            logger.warning("stopping at step %d: max_minutes=%s reached", step, cfg.max_minutes)
            break
    bar.close()
    model.eval()
    check_base_intact(model)
    if _base_fingerprint(model) != fingerprint:
        raise RuntimeError("a frozen base weight changed during fine-tuning")
    return history


def config_dict(cfg: FinetuneConfig) -> dict:
    return asdict(cfg)


def init_distributed_from_env() -> bool:
    """Initialize the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False
