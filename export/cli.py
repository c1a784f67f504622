"""`salr-export OUTPUT.onnx`: compress (or load) a causal LM and export it for ONNX Runtime.

With no other argument it loads the built-in default model (SmolLM2-135M-Instruct), compresses it
with SALR at 50% sparsity (no LoRA: a fresh export has nothing trained) and writes OUTPUT.onnx,
OUTPUT.onnx.data, genai_config.json, the tokenizer files and, when it is built, a copy of the
custom-op library. Bad input ends with a one-line error on stderr and exit code 2, and leaves no file.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

logger = logging.getLogger("salr_edge.export.cli")

# Libraries that log every pass at INFO; their detail drowns the export's own progress lines.
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch._export", "torch.export", "torch.fx")
# torch's exporter warns once per torchvision op it cannot register; torchvision is no dependency here.
_QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salr-export",
        description="Export a causal LM, compressed with SALR (bitmap-sparse + low-rank) or dense, to ONNX.")
    parser.add_argument("output", help="the .onnx file to write (its folder must exist)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None,
                        help="local transformers model folder (default: built-in SmolLM2-135M-Instruct)")
    source.add_argument("--checkpoint", default=None,
                        help="compressed checkpoint folder (from `salr compress` / save_compressed), or a "
                             "SALAAD checkpoint (from `salr salaad train`) to cut with --budget")
    parser.add_argument("--method", choices=["salr", "dense"], default="salr",
                        help="salr: com.salr::SALRLinear nodes; dense: plain MatMul (the baseline)")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction pruned (default 0.5)")
    parser.add_argument("--rank", type=int, default=None, help="SVD residual adapter rank (default 64)")
    parser.add_argument("--granularity", default=None, help="matrix | row | N:M, e.g. 2:4 (default matrix)")
    parser.add_argument("--values", choices=["float", "int8", "int4"], default=None,
                        help="how the sparse base values are stored: float (com.salr::SALRLinear), or int8/int4 with "
                             "one fp16 scale per --group-size values (SALRLinearQ). When compressing, the SVD adapter "
                             "absorbs the quantization error; a float checkpoint is quantized at export. Default: "
                             "float when compressing, as stored for a checkpoint")
    parser.add_argument("--group-size", type=int, default=None,
                        help="values per scale with --values int8/int4 (default 32)")
    parser.add_argument("--budget", default=None,
                        help="SALAAD checkpoints: size to cut to, as a fraction of the targeted layers' dense fp16 "
                             "bytes (0.4, 40%%), bytes (40MB) or parameters (20M params); default: as trained")
    parser.add_argument("--fit", choices=["none", "refit", "project"], default=None,
                        help="SALAAD checkpoints: how the cut is fitted to the trained weights (see `salr salaad "
                             "extract --help`); default none")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="model dtype, activations included")
    parser.add_argument("--values-dtype", choices=["fp16", "fp32"], default="fp16",
                        help="dtype of the stored non-zeros (fp32 only with --dtype fp32)")
    parser.add_argument("--adapter-dtype", choices=["fp16", "fp32"], default=None,
                        help="dtype of the stored adapters (default: the model's; fp16 in an fp32 model halves "
                             "their bytes, cast back at load)")
    parser.add_argument("--lm-head", choices=["float", "int8", "int4"], default="float",
                        help="int8/int4: output projection (and a tied embedding) as ORT MatMulNBits 8/4-bit, block 32")
    parser.add_argument("--no-fuse-linears", action="store_true",
                        help="one node per compressed layer (default: layers reading the same input, q/k/v and "
                             "gate/up, share one node)")
    parser.add_argument("--no-function-fallback", action="store_true",
                        help="omit the standard-ONNX function bodies (the model then needs the library)")
    parser.add_argument("--opset", type=int, default=None,
                        help="default-domain ONNX opset (default 23: fused norm, rotary and attention ops; "
                             "18 for an ONNX Runtime without opset 23)")
    parser.add_argument("--no-genai-config", action="store_true",
                        help="write only the model: no genai_config.json, tokenizer or library copy")
    parser.add_argument("--no-library-copy", action="store_true",
                        help="do not copy libsalr_ops.so next to the model")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def _compression_options_given(args: argparse.Namespace) -> list[str]:
    return [flag for flag, value in (("--sparsity", args.sparsity), ("--rank", args.rank),
                                     ("--granularity", args.granularity)) if value is not None]


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        logger.warning("no tokenizer in %s (%s); genai files will lack it", directory, exc)
        return None


def _salr_config(args: argparse.Namespace):
    """The SALRConfig the CLI compresses with (built, and so validated, before anything loads)."""
    from salr_edge.config import SALRConfig

    quantized = {} if args.values is None else {"values": args.values}
    if args.group_size is not None:
        quantized["group_size"] = args.group_size
    return SALRConfig(sparsity=0.5 if args.sparsity is None else args.sparsity,
                      rank=64 if args.rank is None else args.rank, lora_rank=0,
                      granularity=args.granularity or "matrix", **quantized)


def _load(args: argparse.Namespace, salr_config):
    """(model, tokenizer) ready for export, as the options say; `salr_config` compresses a plain model."""
    from transformers import AutoConfig

    from salr_edge.models import resolve_model_dir

    from .architectures import get_architecture

    if args.checkpoint is not None and (Path(args.checkpoint) / "salaad_config.json").is_file():
        from salr_edge.algorithms.salaad import parse_budget
        from salr_edge.salaad import extract, read_salaad_config

        directory = Path(args.checkpoint)
        read_salaad_config(directory)  # format and version before anything heavy
        if args.budget is not None:
            parse_budget(args.budget)  # a malformed budget fails before the weights load
        get_architecture(AutoConfig.from_pretrained(str(directory)))
        logger.info("cutting SALAAD checkpoint %s to budget %s", directory, args.budget or "as trained")
        return extract(directory, args.budget, fit=args.fit or "none"), _load_tokenizer(directory)

    for option, value in (("--budget", args.budget), ("--fit", args.fit)):
        if value is not None:
            raise ValueError(f"{option} applies only to a SALAAD checkpoint (--checkpoint DIR holding "
                             "salaad_config.json, from `salr salaad train`)")
    if args.checkpoint is not None:
        from salr_edge.checkpoint import load_compressed, read_salr_config

        directory = Path(args.checkpoint)
        read_salr_config(directory)  # existence, format and version before anything heavy
        get_architecture(AutoConfig.from_pretrained(str(directory)))
        logger.info("loading compressed checkpoint %s", directory)
        return load_compressed(directory), _load_tokenizer(directory)

    from salr_edge.models import load_model

    directory = resolve_model_dir(args.model)
    get_architecture(AutoConfig.from_pretrained(str(directory)))  # refuse before loading weights
    logger.info("loading %s", directory)
    model, tokenizer = load_model(directory)
    if salr_config is not None:
        from salr_edge.api import compress_

        logger.info("compressing with SALR (sparsity %.2f, rank %d, granularity %s, values %s)",
                    salr_config.sparsity, salr_config.rank, salr_config.granularity, salr_config.values)
        compress_(model, salr_config, show_progress=not args.quiet)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    from salr_edge.io_utils import check_writable_parent

    from salr_edge.modules.sparse_lowrank_linear import iter_sparse_lowrank

    from .exporter import ExportConfig, export_onnx

    config = ExportConfig(method=args.method, dtype=args.dtype, values_dtype=args.values_dtype, opset=args.opset,
                          adapter_dtype=args.adapter_dtype, lm_head=args.lm_head,
                          function_fallback=not args.no_function_fallback,
                          genai_config=not args.no_genai_config, copy_library=not args.no_library_copy,
                          values=args.values, group_size=args.group_size,
                          fuse_linears=not args.no_fuse_linears)
    given = _compression_options_given(args)
    if given and (args.checkpoint is not None or args.method == "dense"):
        raise ValueError(f"{', '.join(given)} only apply when compressing (--method salr without --checkpoint)")
    compressing = args.method == "salr" and args.checkpoint is None
    salr_config = _salr_config(args) if compressing else None
    output = check_writable_parent(args.output)  # fail before minutes of loading and tracing
    if output.is_dir():
        raise IsADirectoryError(f"output {output} is a directory; give the .onnx file to write")
    start = time.perf_counter()
    model, tokenizer = _load(args, salr_config)
    result = export_onnx(model, output, config, tokenizer=tokenizer)
    total = sum(p.stat().st_size for p in result.files if p.name.startswith(output.name))
    quantized = config.bits is not None or any(m.is_quantized for _, m in iter_sparse_lowrank(model))
    op = "SALRLinearQ" if quantized and config.method == "salr" else "SALRLinear"
    sys.stdout.write(f"wrote {result.model_path} ({total / 2**20:.1f} MiB with its weights, "
                     f"{result.num_compressed_layers} compressed layers in {result.num_salr_nodes} {op} nodes) "
                     f"in {time.perf_counter() - start:.0f} s\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `salr-export`; returns the exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # A terminated export unwinds like an interrupted one, so its staging folder is removed too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from salr_edge.checkpoint import CheckpointError
    from salr_edge.formats.bitmap import BitmapFormatError

    try:
        return run(args)
    except (OSError, ValueError, TypeError, ImportError, CheckpointError, BitmapFormatError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception's own formatting
        sys.stderr.write(f"salr-export: error: {message}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
