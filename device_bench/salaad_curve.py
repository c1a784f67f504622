"""SALAAD quality vs size (issue 6): one SALAAD run, many budgets cut from its single checkpoint, beside
magnitude pruning + SVD residual of the dense model at the same bytes.

1. The dense model's WikiText-2 test perplexity (512-token windows, stride 512, the first `--max-windows`).
2. Baseline at every budget: magnitude pruning (per matrix) + truncated-SVD residual adapter of the dense
   model, no training. For each rank in `--baseline-ranks` the sparsity is solved so the stored bytes match
   the budget; "matched" takes the rank SALAAD's cut uses at that budget (its byte-weighted mean rank).
3. One SALAAD run on WikiText-2 valid within `--max-minutes` (the number of steps is fitted to the time
   from a timing of one step and one ADMM round, unless `--steps` is given), saved as a SALAAD checkpoint.
4. Every budget cut from that checkpoint (`salr_edge.salaad.extract`) and evaluated with each fit in `--fits`:
   "none" as published (L and S as trained), "refit" (same structure, magnitudes re-fit to the trained X by
   least squares), "project" (the planned per-matrix ranks and non-zeros, fitted to X by alternating
   projections); the last two differ from the first where training stopped before X reached L + S. Plus the
   trained dense weights X and the trained structure (factor 1).
5. With `--x-baseline-ranks`, the baseline's method applied to the trained X instead of the dense model: what
   fine-tuning alone buys, so the SALAAD rows can be read as fine-tuning + structure.

Bytes are those of the targeted layers as stored: bitmap + fp16 values + int64 row offsets + fp16 adapters
(`quality_table.layer_bytes`), as a fraction of their dense fp16 bytes. SALAAD trains on WikiText-2 valid
and the baseline is untrained: the "salaad X (dense, trained)" row shows how much of the gap is plain
adaptation to WikiText.

    python -m salr_edge.device_bench.salaad_curve --output device_bench/results/salaad_curve.json \\
        --max-minutes 60 --max-windows 32

Writes OUTPUT (JSON, rewritten after every row; `--resume` keeps its rows), OUTPUT.md and OUTPUT.png; the SALAAD
checkpoint (~1.5 GB for SmolLM2-135M) goes to `--workdir`, outside the repository by default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..algorithms.salaad import layer_bytes as salaad_layer_bytes
from ..algorithms.salaad import FITS, prepare_model
from ..api import compress_
from ..config import SALAADConfig, SALRConfig
from ..data import load_token_stream
from ..evaluation import perplexity
from ..io_utils import atomic_write_text, check_writable_parent
from ..models import cache_dir, load_model
from ..targeting import find_target_linears
from ..training.finetune import FinetuneConfig, batch_for_step, config_dict
from .quality_table import DATA, layer_bytes

logger = logging.getLogger(__name__)


def baseline_sparsity(shapes: list[tuple[int, int]], rank: int, target_bytes: float) -> float | None:
    """Sparsity at which magnitude pruning + a rank-`rank` SVD adapter takes `target_bytes` (None: impossible)."""
    fixed = sum(salaad_layer_bytes(d, k, 0, rank) for d, k in shapes)  # bitmap + offsets + adapters
    entries = sum(d * k for d, k in shapes)
    keep = (target_bytes - fixed) / (2 * entries)
    if rank > min(min(s) for s in shapes) or not 0.0 < keep <= 1.0:
        return None
    return 1.0 - keep


def predicted_fraction(config: SALAADConfig, model, names: list[str]) -> float:
    """Bytes of the trained structure (targets met exactly) over dense fp16 bytes, before any training."""
    total = dense = 0
    for name in names:
        d, k = model.get_submodule(name).weight.shape
        _, rank_ratio, density = config.targets_for(name)
        total += salaad_layer_bytes(d, k, round(density * d * k), math.ceil(rank_ratio * min(d, k)))
        dense += 2 * d * k
    return total / dense


def fit_steps(model, tokens, cfg: FinetuneConfig, config: SALAADConfig, names: list[str],
              minutes: float) -> tuple[int, dict]:
    """Steps that fit in `minutes`: one timed training step (forward + backward) and one timed ADMM round."""
    from ..algorithms import admm

    device = next(model.parameters()).device
    model.train()
    batch = batch_for_step(tokens, 0, 0, cfg, 0, 1).to(device)
    model(input_ids=batch, labels=batch).loss.backward()  # warm-up: the first step pays one-off set-up costs
    t0 = time.perf_counter()
    for micro in range(cfg.grad_accum):
        batch = batch_for_step(tokens, 0, micro, cfg, 0, 1).to(device)
        model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t0) * 1.15  # optimizer, clipping and the penalty
    model.eval()
    admm.svd(torch.randn(64, 48), config.svd_method, 8, config.svd_niter)  # the first call pays library set-up
    t0 = time.perf_counter()
    for name in names:
        w = model.get_submodule(name).weight.detach().float()
        cap = math.ceil(config.svd_rank_cap * min(w.shape))
        admm.svd(w, config.svd_method, cap, config.svd_niter, torch.Generator().manual_seed(0))
    round_s = (time.perf_counter() - t0) * 1.5  # the round's GEMMs, thresholding and the target refresh
    per_step = step_s + round_s / config.admm_every
    steps = max(config.admm_every, int(0.95 * minutes * 60 / per_step))
    return steps, {"step_seconds": step_s, "round_seconds": round_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="transformers dir (default: built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", default=DATA, help="the shared data folder (holds wikitext-2/)")
    parser.add_argument("--output", required=True, help="JSON file to write (.md and .png are written beside it)")
    parser.add_argument("--workdir", default=None,
                        help="SALAAD checkpoint dir (default: <salr-edge cache>/salaad/<OUTPUT stem>_ckpt)")
    parser.add_argument("--max-windows", type=int, default=32, help="512-token WikiText-2 test windows evaluated")
    parser.add_argument("--budgets", default="0.9,0.75,0.6,0.5,0.4,0.35",
                        help="fractions of the dense fp16 bytes of the targeted layers")
    parser.add_argument("--baseline-ranks", default="matched,64",
                        help="SVD residual ranks of the baseline ('matched': SALAAD's mean rank at that budget)")
    parser.add_argument("--x-baseline-ranks", default="",
                        help="the baseline's ranks applied to the trained X as well (e.g. 'matched'; default none)")
    parser.add_argument("--fits", default="none,refit,project",
                        help="fits of the SALAAD cuts to evaluate (none: as published; refit; project)")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock limit of the SALAAD training")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: fitted to --max-minutes)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--target-rank-ratio-attn", type=float, default=0.25)
    parser.add_argument("--target-rank-ratio-mlp", type=float, default=0.3)
    parser.add_argument("--target-density-attn", type=float, default=0.45)
    parser.add_argument("--target-density-mlp", type=float, default=0.45)
    parser.add_argument("--admm-every", type=int, default=10)
    parser.add_argument("--rho", type=float, default=1e-2)
    parser.add_argument("--rho-schedule", choices=["fixed", "shape", "ramp"], default="ramp")
    parser.add_argument("--rho-max", type=float, default=1.0)
    parser.add_argument("--rho-growth", type=float, default=None,
                        help="ramp factor per round (default: reach --rho-max after 70%% of the rounds)")
    parser.add_argument("--svd-method", choices=["full", "randomized"], default="full")
    parser.add_argument("--svd-rank-cap", type=float, default=0.5,
                        help="randomized SVD: fraction of min(d, k) computed (must cover the rank targets)")
    parser.add_argument("--sparse-step", choices=["soft", "hard"], default="soft",
                        help="S step: soft thresholding (the method) or the target density's largest entries")
    parser.add_argument("--skip-train", action="store_true", help="reuse the SALAAD checkpoint in --workdir")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output and skip them")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from ..salaad import SALAAD_CONFIG_NAME, extract, load_salaad_checkpoint, save_salaad_checkpoint, train_salaad

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    out = check_writable_parent(args.output)  # fail before minutes of loading and training
    workdir = Path(args.workdir) if args.workdir else cache_dir() / "salaad" / f"{out.stem}_ckpt"  # ~1.5 GB
    budgets = [float(b) for b in args.budgets.split(",") if b]
    fits = [f for f in args.fits.split(",") if f]
    if not fits or any(f not in FITS for f in fits):
        parser.error(f"--fits takes a comma-separated subset of {', '.join(FITS)}, got {args.fits!r}")
    base, tokenizer = load_model(args.model)
    base.to(device)
    data = Path(args.data_dir) / "wikitext-2"
    test = load_token_stream(data / "test.txt", tokenizer)
    valid = load_token_stream(data / "valid.txt", tokenizer)
    names = find_target_linears(base, "all-linear")
    shapes = [tuple(base.get_submodule(n).weight.shape) for n in names]
    dense_bytes = sum(2 * d * k for d, k in shapes)
    report = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    rows: list[dict] = report.get("rows", [])
    done = {(r["variant"], r.get("budget")) for r in rows}
    report.update({"model": args.model or "SmolLM2-135M-Instruct", "max_windows": args.max_windows, "context": 512,
                   "stride": 512, "dense_fp16_layer_bytes": dense_bytes, "budgets": budgets, "rows": rows})

    def save() -> None:
        atomic_write_text(out, json.dumps(report, indent=1))

    def record(variant: str, budget: float | None, model, extra: dict | None = None) -> None:
        t0 = time.time()
        model.to(device)
        ppl = perplexity(model, test, 512, max_windows=args.max_windows, show_progress=False)
        comp = layer_bytes(model)[0] if extra is None or "layer_bytes" not in extra else extra["layer_bytes"]
        row = {"variant": variant, "budget": budget, "ppl": ppl, "layer_bytes": comp or dense_bytes,
               "fraction_of_dense": (comp or dense_bytes) / dense_bytes, "eval_seconds": time.time() - t0,
               **(extra or {})}
        rows.append(row)
        logger.info("%s", json.dumps(row))
        save()

    if ("dense", None) not in done:
        record("dense", None, base, {"layer_bytes": dense_bytes})

    # ---- SALAAD training (one run) ------------------------------------------------------------------
    # modules neither attention nor MLP (none in a Llama) take the larger targets
    config = SALAADConfig(target_rank_ratio=max(args.target_rank_ratio_attn, args.target_rank_ratio_mlp),
                          target_density=max(args.target_density_attn, args.target_density_mlp),
                          target_rank_ratio_attn=args.target_rank_ratio_attn,
                          target_rank_ratio_mlp=args.target_rank_ratio_mlp,
                          target_density_attn=args.target_density_attn, target_density_mlp=args.target_density_mlp,
                          admm_every=args.admm_every, rho=args.rho, rho_schedule=args.rho_schedule,
                          rho_max=max(args.rho_max, args.rho), svd_method=args.svd_method,
                          svd_rank_cap=args.svd_rank_cap, sparse_step=args.sparse_step)
    structure = predicted_fraction(config, base, names)
    if structure < max(budgets):
        logger.info("the targets give a structure of %.3f of dense, below the largest budget %.2f: cuts above it "
                    "keep all of L and S plus the largest entries of X − L", structure, max(budgets))
    if not (args.skip_train and (workdir / SALAAD_CONFIG_NAME).is_file()):
        model = copy.deepcopy(base)
        train = FinetuneConfig(steps=args.steps or 1, batch_size=args.batch_size, grad_accum=args.grad_accum,
                               seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
                               max_minutes=args.max_minutes, log_every=10)
        timing = {}
        if args.steps is None:
            prepare_model(model, config)  # time the step SALAAD runs: gradients for the targeted weights only
            steps, timing = fit_steps(model, valid, train, config, names, args.max_minutes)
            train = dataclasses.replace(train, steps=steps)
            logger.info("fitted %d steps to %.0f minutes (%s)", steps, args.max_minutes, timing)
        if args.rho_growth is None and config.rho_schedule == "ramp":
            rounds = max(1, train.steps // config.admm_every)
            growth = (config.rho_max / config.rho) ** (1 / max(1.0, 0.7 * rounds))
            config = dataclasses.replace(config, rho_growth=growth)
        elif args.rho_growth is not None:
            config = dataclasses.replace(config, rho_growth=args.rho_growth)
        t0 = time.time()
        workdir.mkdir(parents=True, exist_ok=True)
        history, trainer = train_salaad(model, valid, config, train, log_path=workdir / "salaad_log.jsonl")
        minutes = (time.time() - t0) / 60
        states = trainer.states.values()
        report["training"] = {"config": config.to_dict(), "train": config_dict(train),
                              "steps_done": history[-1]["step"],
                              "minutes": minutes, "final_loss": history[-1]["loss"], "timing": timing,
                              "predicted_structure_fraction": structure,
                              "mean_rank_ratio": sum(s.rank_ratio for s in states) / len(states),
                              "mean_density": sum(s.density for s in states) / len(states),
                              "max_rel_residual": max(s.log_row()["rel_residual"] for s in states)}
        save_salaad_checkpoint(model, trainer, workdir, tokenizer, extra={"train": config_dict(train),
                                                                           "history": history})
        save()
        rows[:] = [r for r in rows if "salaad" not in r["variant"]]  # a new run replaces the rows it made
        done = {(r["variant"], r.get("budget")) for r in rows}
        record("salaad X (dense, trained)", None, model, {"layer_bytes": dense_bytes})
        del model, trainer

    # ---- cuts of the one checkpoint -------------------------------------------------------------------
    matched: dict[float, int] = {}
    for budget, fit in [(b, f) for b in [None, *budgets] for f in fits]:
        variant = ("salaad" if budget is not None else "salaad (trained structure)") + \
            ("" if fit == "none" else f" + {fit}")
        if (variant, budget) in done and (budget is None or budget in matched):
            continue
        try:
            model = extract(workdir, budget, fit=fit)
        except ValueError as exc:
            logger.warning("budget %s: %s", budget, exc)
            if (variant, budget) not in done:
                rows.append({"variant": variant, "budget": budget, "ppl": None, "error": str(exc)})
                save()
            continue
        plan = model.salr_metadata["config"]["extraction"]
        if budget is not None and budget not in matched:  # the plan (and so the rank) is the same for every fit
            weights = {n: 2 * s[0] * s[1] for n, s in zip(names, shapes)}
            ranks = sum(plan["layers"][n]["rank"] * w for n, w in weights.items())
            matched[budget] = round(ranks / sum(weights.values()))
        if (variant, budget) not in done:
            record(variant, budget, model, {"factor": plan["factor"], "params": plan["params"],
                                            "mean_rank": sum(v["rank"] for v in plan["layers"].values()) / len(names)})
        del model

    # ---- baseline: magnitude pruning + SVD residual of the dense model (and of the trained X) ----------
    trained_x = None
    for budget, of_x, spec in [(b, x, r) for x, ranks in ((False, args.baseline_ranks), (True, args.x_baseline_ranks))
                               for b in budgets for r in ranks.split(",") if r]:
        rank = matched.get(budget) if spec == "matched" else int(spec)
        if rank is None:
            continue
        variant = f"magnitude+svd{' of salaad X' if of_x else ''} (rank {'matched' if spec == 'matched' else rank})"
        if (variant, budget) in done:
            continue
        sparsity = baseline_sparsity(shapes, rank, budget * dense_bytes)
        if sparsity is None:
            rows.append({"variant": variant, "budget": budget, "ppl": None, "rank": rank,
                         "error": "no sparsity in [0, 1) meets this budget with this rank"})
            save()
            continue
        if of_x and trained_x is None:
            trained_x = load_salaad_checkpoint(workdir)[0]
        model = copy.deepcopy(trained_x if of_x else base)
        compress_(model, SALRConfig(sparsity=sparsity, rank=rank, lora_rank=0, pruning="magnitude"),
                  show_progress=False)
        record(variant, budget, model, {"sparsity": sparsity, "rank": rank})
        del model

    _write_markdown(out, report)
    _plot(out, report)
    return 0


def _write_markdown(out: Path, report: dict) -> None:
    md = [f"WikiText-2 test perplexity, {report['max_windows']} windows of {report['context']} tokens; bytes of the "
          f"targeted layers (bitmap + fp16 values + int64 offsets + fp16 adapters) over their dense fp16 bytes.", "",
          "| variant | budget | bytes / dense fp16 | ppl |", "|---|---|---|---|"]
    for r in report["rows"]:
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") is not None else f"— ({r.get('error', '')[:60]})"
        frac = f"{r['fraction_of_dense']:.3f}" if "fraction_of_dense" in r else "—"
        md.append(f"| {r['variant']} | {r['budget'] if r['budget'] is not None else '—'} | {frac} | {ppl} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")


STAR_COLORS = {"refit": "tab:orange", "project": "tab:green"}


def _plot(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in report["rows"]:
        if r.get("ppl") is None:
            continue
        if r["budget"] is None:
            if r["variant"].startswith("salaad (trained structure)"):  # a point: its size is whatever training reached
                ax.plot([r["fraction_of_dense"]], [r["ppl"]], marker="*", markersize=12, linestyle="none",
                        color=STAR_COLORS.get(r["variant"].partition(" + ")[2], "tab:blue"),
                        label=f"{r['variant']} ({r['ppl']:.1f})")
            else:
                style = ("--", "black") if r["variant"] == "dense" else (":", "tab:purple")
                ax.axhline(r["ppl"], linestyle=style[0], color=style[1], linewidth=1,
                           label=f"{r['variant']} ({r['ppl']:.1f})")
            continue
        curves.setdefault(r["variant"], []).append((r["fraction_of_dense"], r["ppl"]))
    colors = {"salaad": "tab:blue", **{f"salaad + {f}": c for f, c in STAR_COLORS.items()}}  # as the stars
    others = iter(["tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for variant, points in curves.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant,
                color=colors.get(variant) or next(others, None))
    ax.set_yscale("log")
    ax.set_xlabel("stored bytes of the targeted layers / dense fp16")
    ax.set_ylabel(f"WikiText-2 test perplexity ({report['max_windows']}×{report['context']} tokens)")
    ax.set_title(f"SALAAD cuts of one checkpoint vs magnitude + SVD\n({report['model']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
