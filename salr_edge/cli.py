"""`salr`: compress, fine-tune, evaluate and generate from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import DEFAULT_GROUP_SIZE, VALUE_FORMATS

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name])


def _load_any(path: str | None):
    """(model, tokenizer) from a compressed checkpoint, a transformers dir, or the default model (None)."""
    from transformers import AutoTokenizer

    from .checkpoint import SALR_CONFIG_NAME, load_compressed
    from .models import load_model

    if path is not None and (Path(path) / SALR_CONFIG_NAME).is_file():
        return load_compressed(path), AutoTokenizer.from_pretrained(path)
    return load_model(path)


def cmd_compress(args: argparse.Namespace) -> int:
    from .api import compress_
    from .checkpoint import save_compressed
    from .config import SALRConfig
    from .data import calibration_batches, load_token_stream
    from .io_utils import check_writable_parent
    from .models import load_model

    config = SALRConfig(sparsity=args.sparsity, rank=args.rank, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        pruning=args.pruning, granularity=args.granularity, svd_method=args.svd,
                        target_modules=args.target_modules, exclude_modules=args.exclude_modules,
                        values=args.values, group_size=args.group_size)
    check_writable_parent(args.output)
    if config.pruning == "wanda" and not args.calib_data:
        raise ValueError("--pruning wanda needs --calib-data PATH (e.g. ../shared/data/wikitext-2/valid.txt)")
    model, tokenizer = load_model(args.model)
    calib = None
    if args.calib_data:
        tokens = load_token_stream(args.calib_data, tokenizer)
        calib = calibration_batches(tokens, args.calib_seq_len, args.calib_samples)
    compress_(model, config, calib_data=calib)
    save_compressed(model, args.output, tokenizer=tokenizer, values_dtype=_torch_dtype(args.values_dtype))
    print(f"compressed model written to {args.output}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .checkpoint import load_compressed, save_compressed
    from .data import load_token_stream
    from .io_utils import check_writable_parent
    from .training.finetune import FinetuneConfig, finetune, init_distributed_from_env

    check_writable_parent(args.output)
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                         save_every=args.save_every, max_minutes=args.max_minutes, output_dir=args.output,
                         resume=args.resume)
    distributed = init_distributed_from_env()
    model = load_compressed(args.checkpoint, dtype=_torch_dtype("fp32"))
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    tokens = load_token_stream(args.data, tokenizer)
    history = finetune(model, tokens, cfg)
    import torch.distributed as dist

    if not distributed or dist.get_rank() == 0:
        save_compressed(model, args.output, tokenizer=tokenizer)
        (Path(args.output) / "finetune_history.json").write_text(json.dumps(history, indent=1))
        print(f"fine-tuned model written to {args.output} (final loss {history[-1]['loss']:.4f})")
    if distributed:
        dist.destroy_process_group()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_token_stream
    from .evaluation import gsm8k_accuracy, perplexity

    model, tokenizer = _load_any(args.model_or_checkpoint)
    if Path(args.data).suffix == ".jsonl":
        result = gsm8k_accuracy(model, tokenizer, args.data, limit=args.limit, max_new_tokens=args.max_new_tokens)
    else:
        tokens = load_token_stream(args.data, tokenizer)
        ppl = perplexity(model, tokens, context=args.context, max_windows=args.max_windows)
        result = {"perplexity": ppl, "context": args.context, "stride": args.context,
                  "max_windows": args.max_windows}
    print(json.dumps(result))
    return 0


_SALAAD_FLAGS = ("target_rank_ratio", "target_density", "target_rank_ratio_attn", "target_rank_ratio_mlp",
                 "target_density_attn", "target_density_mlp", "admm_every", "rho", "rho_schedule", "rho_growth",
                 "rho_max", "alpha0", "beta0", "alpha_gain", "beta_gain", "damping", "damping_after", "svd_method",
                 "svd_rank_cap", "svd_niter", "energy", "sparse_step", "target_modules", "exclude_modules")


def cmd_salaad_train(args: argparse.Namespace) -> int:
    from .config import SALAADConfig
    from .data import load_token_stream
    from .io_utils import check_writable_parent
    from .models import load_model
    from .salaad import save_salaad_checkpoint, train_salaad
    from .training.finetune import FinetuneConfig, config_dict, init_distributed_from_env

    fields = json.loads(Path(args.config).read_text()) if args.config else {}
    fields.update({f: getattr(args, f) for f in _SALAAD_FLAGS if getattr(args, f) is not None})
    config = SALAADConfig.from_dict(fields)
    check_writable_parent(args.output)
    train = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                           seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                           save_every=args.save_every, max_minutes=args.max_minutes, output_dir=args.output,
                           resume=args.resume)
    distributed = init_distributed_from_env()
    model, tokenizer = load_model(args.model)
    tokens = load_token_stream(args.data, tokenizer)
    Path(args.output).mkdir(exist_ok=True)
    history, trainer = train_salaad(model, tokens, config, train, log_path=Path(args.output) / "salaad_log.jsonl")
    save_salaad_checkpoint(model, trainer, args.output, tokenizer=tokenizer,
                           extra={"train": config_dict(train), "history": history})
    import torch.distributed as dist

    if not distributed or dist.get_rank() == 0:
        print(f"SALAAD checkpoint written to {args.output} (final loss {history[-1]['loss']:.4f}); cut it with "
              f"`salr salaad extract --checkpoint {args.output} --budget 0.4 --output DIR`")
    if distributed:
        dist.destroy_process_group()
    return 0


def cmd_salaad_extract(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .checkpoint import save_compressed
    from .io_utils import check_writable_parent
    from .salaad import extract, read_salaad_config

    check_writable_parent(args.output)
    read_salaad_config(args.checkpoint)  # a clear error before loading anything heavy
    model = extract(args.checkpoint, args.budget, fit=args.fit)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    except (OSError, ValueError):
        tokenizer = None
    save_compressed(model, args.output, tokenizer=tokenizer, values_dtype=_torch_dtype(args.values_dtype),
                    adapter_dtype=_torch_dtype(args.values_dtype))
    plan = model.salr_metadata["config"]["extraction"]
    print(json.dumps({k: v for k, v in plan.items() if k != "layers"}))
    return 0


def _targets(value: str | None):
    if value is None or value == "all-linear":
        return value
    return value.split(",") if "," in value else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salr", description="Sparse + low-rank LLM compression (SALR).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="prune + SVD residual + LoRA adapters; writes a compressed checkpoint")
    p.add_argument("--model", help="local transformers model dir (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights pruned, in [0, 1)")
    p.add_argument("--rank", type=int, default=64, help="SVD residual adapter rank (0: none)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA adapter rank (0: none)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--pruning", choices=["magnitude", "wanda"], default="magnitude")
    p.add_argument("--granularity", default="matrix", help="matrix | row | N:M (e.g. 2:4)")
    p.add_argument("--svd", choices=["full", "randomized"], default="full")
    p.add_argument("--target-modules", type=_targets, default="all-linear",
                   help="'all-linear', a regex, or a comma-separated list of module names/suffixes")
    p.add_argument("--exclude-modules", type=_targets, default=None)
    p.add_argument("--calib-data", help="text/jsonl file for Wanda calibration")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--values-dtype", choices=sorted(_DTYPES), default="fp32",
                   help="dtype of stored non-zeros when --values is float")
    p.add_argument("--values", choices=list(VALUE_FORMATS), default="float",
                   help="int8/int4: quantize the kept values (bitmap format v2); the SVD residual absorbs the error")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="non-zeros per fp16 scale (int8/int4)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("finetune", help="train the adapters of a compressed checkpoint (torchrun-ready)")
    p.add_argument("--checkpoint", required=True, help="compressed checkpoint dir")
    p.add_argument("--data", required=True, help=".txt (e.g. WikiText-2 valid) or .jsonl (e.g. GSM8K train)")
    p.add_argument("--output", required=True, help="directory for the fine-tuned checkpoint and trainer state")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint the trainer state every N steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/trainer_state")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="perplexity (.txt) or GSM8K accuracy (.jsonl)")
    p.add_argument("--model-or-checkpoint", default=None,
                   help="compressed checkpoint or transformers dir (default: built-in model)")
    p.add_argument("--data", required=True)
    p.add_argument("--context", type=int, default=512, help="window length; stride = window (no overlap)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--limit", type=int, default=50, help="GSM8K: number of problems (the first N)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("salaad", help="SALAAD: ADMM training toward sparse + low-rank, then cut to any budget")
    salaad = p.add_subparsers(dest="salaad_command", required=True)
    p = salaad.add_parser("train", help="train a model with SALAAD; writes a SALAAD checkpoint (torchrun-ready)")
    p.add_argument("--model", help="local transformers model dir (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, help=".txt (e.g. WikiText-2 valid) or .jsonl training data")
    p.add_argument("--output", required=True, help="checkpoint directory (also holds trainer_state and the log)")
    p.add_argument("--config", help="SALAADConfig JSON file; flags given here override its values")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW peak learning rate of the dense weights")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint the trainer state every N steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/trainer_state")
    for name, kind in (("target_rank_ratio", float), ("target_density", float), ("target_rank_ratio_attn", float),
                       ("target_rank_ratio_mlp", float), ("target_density_attn", float),
                       ("target_density_mlp", float), ("admm_every", int), ("rho", float), ("rho_growth", float),
                       ("rho_max", float), ("alpha0", float), ("beta0", float), ("alpha_gain", float),
                       ("beta_gain", float), ("damping", float), ("damping_after", int), ("svd_rank_cap", float),
                       ("svd_niter", int), ("energy", float)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help="SALAADConfig." + name + " (default: the config's)")
    p.add_argument("--rho-schedule", choices=["fixed", "shape", "ramp"], default=None)
    p.add_argument("--svd-method", choices=["full", "randomized"], default=None)
    p.add_argument("--sparse-step", choices=["soft", "hard"], default=None,
                   help="S step: soft thresholding (default, the method) or the target density's largest entries")
    p.add_argument("--target-modules", type=_targets, default=None,
                   help="'all-linear', a regex, or a comma-separated list of module names/suffixes")
    p.add_argument("--exclude-modules", type=_targets, default=None)
    p.set_defaults(func=cmd_salaad_train)
    p = salaad.add_parser("extract", help="cut a SALAAD checkpoint to a size budget; writes a compressed checkpoint")
    p.add_argument("--checkpoint", required=True, help="SALAAD checkpoint dir (from `salr salaad train`)")
    p.add_argument("--budget", default=None,
                   help="fraction of the dense fp16 bytes of the targeted layers (0.4, 40%%), bytes (40MB, "
                        "40000000) or parameters (20M params); default: the trained structure")
    p.add_argument("--output", required=True, help="compressed checkpoint directory to write")
    p.add_argument("--values-dtype", choices=sorted(_DTYPES), default="fp16",
                   help="dtype of the stored non-zeros and adapters (the budget counts fp16)")
    p.add_argument("--fit", choices=["none", "refit", "project"], default="none",
                   help="none: L and S as trained (default); refit: their structure, values re-fit to the trained "
                        "weights by least squares; project: the planned ranks and non-zeros, directions and "
                        "entries re-chosen by alternating projections onto the trained weights")
    p.set_defaults(func=cmd_salaad_extract)

    try:
        from .runtime import add_generate_arguments, generate_main
    except ImportError:
        pass
    else:
        p = sub.add_parser("generate", help="generate text from an exported ONNX model through ONNX Runtime")
        add_generate_arguments(p)
        p.set_defaults(func=generate_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .checkpoint import CheckpointError
    from .formats.bitmap import BitmapFormatError

    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, PermissionError, NotADirectoryError, ValueError, TypeError, CheckpointError,
            BitmapFormatError, ImportError) as exc:
        print(f"salr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
