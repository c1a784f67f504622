"""Quality vs bytes of SALR variants on one model: the table behind BENCHMARKS.md (issue 2).

For each granularity (unstructured per matrix, 2:4) it measures WikiText-2 test perplexity and the
stored bytes of the targeted layers (bitmap + fp16 values + int64 row offsets + fp16 adapters)
for: dense, magnitude, magnitude+SVD residual (r = 16, 64), Wanda, Wanda+SVD, and SALR after LoRA
recovery fine-tuning on WikiText-2 valid within a wall-clock budget.

    python -m salr_edge.device_bench.quality_table --output quality.json --max-windows 64 --finetune-minutes 30
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from ..algorithms.calibration import input_feature_norms
from ..api import compress_
from ..checkpoint import save_compressed
from ..config import SALRConfig
from ..data import calibration_batches, load_token_stream
from ..evaluation import perplexity
from ..formats.bitmap import stored_layer_bytes
from ..io_utils import atomic_write_text
from ..models import load_model
from ..modules.sparse_lowrank_linear import iter_sparse_lowrank
from ..targeting import find_target_linears
from ..training.finetune import FinetuneConfig, finetune

logger = logging.getLogger(__name__)

DATA = "../shared/data"  # relative to the project root, where the commands are run


def layer_bytes(model, value_bytes: int = 2, adapter_bytes: int = 2) -> tuple[int, int]:
    """(compressed bytes, dense bytes at `value_bytes`) summed over the SparseLowRankLinear layers.

    Float bases count `value_bytes` per kept value; quantized ones their stored integers and scales.
    """
    comp = dense = 0
    for _, m in iter_sparse_lowrank(model):
        n, k = m.out_features, m.in_features
        nnz = int(m.salr_mask.sum())
        comp += stored_layer_bytes(n, k, nnz, m.total_rank, value_bytes, adapter_bytes, m.bits, m.group_size)
        dense += n * k * value_bytes
    return comp, dense


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="transformers dir (default: built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", default=DATA, help="the shared data folder (wikitext-2/, gsm8k/)")
    parser.add_argument("--output", required=True, help="JSON file to write (a .md table is written beside it)")
    parser.add_argument("--max-windows", type=int, default=64, help="512-token test windows evaluated")
    parser.add_argument("--granularities", default="matrix,2:4")
    parser.add_argument("--finetune-minutes", type=float, default=30.0)
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--salr-rank", type=int, default=8, help="SVD residual rank of the recovered SALR model")
    parser.add_argument("--salr-lora-rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--svd-ranks", default="0,16,64", help="SVD residual ranks of the no-fine-tuning variants")
    parser.add_argument("--wanda-svd-ranks", default="0,16,64")
    parser.add_argument("--calib-samples", type=int, default=32, help="512-token WikiText-2 valid windows for Wanda")
    parser.add_argument("--save-dir", default=None,
                        help="write each fine-tuned SALR model as a compressed checkpoint DIR/salr-<granularity>")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output and skip them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    base, tokenizer = load_model(args.model)
    data = Path(args.data_dir)
    test = load_token_stream(data / "wikitext-2" / "test.txt", tokenizer)
    valid = load_token_stream(data / "wikitext-2" / "valid.txt", tokenizer)
    out = Path(args.output)
    rows: list[dict] = json.loads(out.read_text())["rows"] if args.resume and out.is_file() else []
    done = {(r["variant"], r["granularity"]) for r in rows}

    def record(name: str, granularity: str, model, extra: dict | None = None) -> None:
        t0 = time.time()
        ppl = perplexity(model, test, 512, max_windows=args.max_windows, show_progress=False)
        comp, dense = layer_bytes(model) if any(True for _ in iter_sparse_lowrank(model)) else (None, dense_bytes)
        row = {"variant": name, "granularity": granularity, "ppl": ppl, "layer_bytes": comp,
               "dense_fp16_layer_bytes": dense, "ratio_vs_dense_fp16": (comp / dense) if comp else 1.0,
               "eval_seconds": time.time() - t0, **(extra or {})}
        rows.append(row)
        logger.info("%s", json.dumps(row))
        atomic_write_text(out, json.dumps({"max_windows": args.max_windows, "context": 512, "rows": rows}, indent=1))

    names = find_target_linears(base, "all-linear")
    dense_bytes = sum(base.get_submodule(n).weight.numel() * 2 for n in names)
    if ("dense", "-") not in done:
        record("dense", "-", base)
    norms = input_feature_norms(base, names, calibration_batches(valid, 512, args.calib_samples), show_progress=False)
    for gran in args.granularities.split(","):
        for pruning, ranks in (("magnitude", args.svd_ranks), ("wanda", args.wanda_svd_ranks)):
            for rank in (int(r) for r in ranks.split(",") if r):
                name = f"{pruning}" + (f"+svd{rank}" if rank else "")
                if (name, gran) in done:
                    continue
                model = copy.deepcopy(base)
                compress_(model, SALRConfig(sparsity=0.5, rank=rank, lora_rank=0, pruning=pruning, granularity=gran),
                          input_norms=norms, show_progress=False)
                record(name, gran, model)
                del model
        if args.skip_finetune:
            continue
        salr_name = f"wanda+svd{args.salr_rank}+lora{args.salr_lora_rank}"
        if (f"SALR {salr_name} (after FT)", gran) in done:
            continue
        model = copy.deepcopy(base)
        compress_(model, SALRConfig(sparsity=0.5, rank=args.salr_rank, lora_rank=args.salr_lora_rank,
                                    lora_alpha=2.0 * args.salr_lora_rank, pruning="wanda", granularity=gran),
                  input_norms=norms, show_progress=False)
        if (f"{salr_name} (before FT)", gran) not in done:
            record(f"{salr_name} (before FT)", gran, model)
        cfg = FinetuneConfig(steps=args.finetune_steps, batch_size=4, seq_len=256, lr=args.lr, warmup_steps=20,
                             max_minutes=args.finetune_minutes, log_every=10)
        t0 = time.time()
        history = finetune(model, valid, cfg, show_progress=False)
        record(f"SALR {salr_name} (after FT)", gran, model,
               {"finetune_steps": history[-1]["step"], "finetune_seconds": time.time() - t0,
                "final_loss": history[-1]["loss"]})
        if args.save_dir:
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            save_compressed(model, Path(args.save_dir) / f"salr-{gran.replace(':', 'of')}", tokenizer=tokenizer,
                            values_dtype=torch.float16, adapter_dtype=torch.float16)
        del model
    md = ["| variant | granularity | WikiText-2 test ppl | layer bytes (MB) | vs dense fp16 |", "|---|---|---|---|---|"]
    for r in rows:
        mb = f"{r['layer_bytes'] / 1e6:.1f}" if r["layer_bytes"] else f"{(r.get('dense_fp16_layer_bytes') or 0) / 1e6:.1f}"
        md.append(f"| {r['variant']} | {r['granularity']} | {r['ppl']:.2f} | {mb} | {r['ratio_vs_dense_fp16']:.3f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
