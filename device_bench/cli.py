"""`salr-bench`: end-to-end latency, tokens/s, memory, size and quality of exported models on this device.

    salr-bench model.onnx --baselines --threads 2 --prompt-len 128 --gen-len 128
    salr-bench --kernel [kernel benchmark options]      # one SALRLinear node vs MatMul / MatMulNBits

Each model first passes a correctness gate (finite logits; for models with com.salr ops, the
library's kernels must match the same file run through its standard-ONNX function bodies). Then all
models are timed interleaved, run by run, so machine drift hits every model alike.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from .baselines import default_name, ensure_baselines
from .harness import DecoderIO, file_bytes, generate_timed, perplexity, probe_memory, profile_ops, run_step
from .records import BenchRecord, ModelSummary, RunRecord, device_description, git_commit, now

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
WIKITEXT_TEST = "../shared/data/wikitext-2/test.txt"
# Library kernels vs function bodies accumulate in different orders; over a whole decoder the logits
# drift by ~1e-5..1e-4 relative in fp32. A wrong kernel is off by O(1).
GATE_RTOL = {"tensor(float)": 2e-3, "tensor(float16)": 5e-2}


class BenchError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _check_onnx(path: str) -> Path:
    import onnx

    p = Path(path)
    if not p.is_file():
        raise BenchError(f"model file {p} does not exist")
    try:
        onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError/ValueError/... for a non-ONNX file
        raise BenchError(f"{p} is not an ONNX model ({type(exc).__name__})") from exc
    return p


def _providers(name: str) -> list[str]:
    import onnxruntime as ort

    wanted = PROVIDERS[name]
    available = ort.get_available_providers()
    if wanted not in available:
        raise BenchError(f"provider {name} ({wanted}) is not available in this onnxruntime; available: "
                         f"{', '.join(available)} (install onnxruntime-gpu for CUDA)")
    return [wanted, "CPUExecutionProvider"] if name == "cuda" else [wanted]


def _session(path: Path, providers: list[str], threads: int, use_library: bool | None, profile_dir: str | None = None):
    from ..runtime import LibraryRequiredError, make_session

    try:
        return make_session(path, providers=providers, threads=threads, use_library=use_library,
                            profile_prefix=None if profile_dir is None else str(Path(profile_dir) / path.stem))
    except LibraryRequiredError as exc:
        raise BenchError(str(exc)) from exc


def _eval_tokens(tokenizer_dir: str | None) -> np.ndarray | None:
    """WikiText-2 test tokens (prompt source and perplexity data), or None without tokenizer or data."""
    text = Path(WIKITEXT_TEST)
    if tokenizer_dir is None or not text.is_file():
        logger.warning("no tokenizer or no %s: synthetic prompt, perplexity column skipped", WIKITEXT_TEST)
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer(text.read_text(encoding="utf-8")[:400_000], add_special_tokens=False,
                     return_tensors="np").input_ids[0].astype(np.int64)


def _prompt(eval_tokens: np.ndarray | None, session, length: int, batch: int) -> np.ndarray:
    """A deterministic prompt [batch, length]: real text when available, else ids spread over the vocabulary."""
    if eval_tokens is not None and eval_tokens.size >= 1000 + length:
        row = eval_tokens[1000:1000 + length]
    else:
        vocab = session.get_outputs()[0].shape[-1]
        vocab = vocab if isinstance(vocab, int) else 1000
        row = (np.arange(length, dtype=np.int64) * 7919 + 13) % vocab
    return np.repeat(row[None], batch, axis=0)  # (B, T)


def _gate(path: Path, session, io: DecoderIO, providers, threads, prompt: np.ndarray, uses_salr: bool) -> dict:
    logits, _ = run_step(session, io, prompt, None, 0)
    result: dict = {"finite": bool(np.isfinite(logits).all())}
    if uses_salr:
        reference = _session(path, providers, threads, use_library=False)
        ref_logits, _ = run_step(reference, DecoderIO.from_session(reference), prompt, None, 0)
        diff = float(np.abs(logits.astype(np.float64) - ref_logits).max())
        scale = 1.0 + float(np.abs(ref_logits).max())
        kind = session.get_outputs()[0].type
        result.update(max_abs_diff=diff, tolerance=GATE_RTOL.get(kind, 2e-3) * scale,
                      reference="com.salr function bodies (standard ONNX ops) on vanilla ORT")
        result["matches_reference"] = diff <= result["tolerance"]
    result["passed"] = result["finite"] and result.get("matches_reference", True)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salr-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="exported .onnx models (the first is the reference for ratios)")
    parser.add_argument("--baselines", action="store_true",
                        help="also build (cached) and benchmark the dense fp32 export and ORT int4 MatMulNBits "
                             "of --source, placed first")
    parser.add_argument("--source", default=None, help="source model dir of the baselines (default: built-in model)")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed generations per model (medians reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ppl-windows", type=int, default=4,
                        help="512-token WikiText-2 test windows for the quality column (0: skip)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer dir for prompt/perplexity (default: the model folder's, else the built-in model's)")
    parser.add_argument("--prefill-sweep", default="", help="comma-separated prompt lengths for a latency plot")
    parser.add_argument("--no-library", action="store_true",
                        help="run com.salr models through their function bodies instead of the library")
    parser.add_argument("--profile", action="store_true", help="ORT profiling: time per op type")
    parser.add_argument("--no-memory-probe", action="store_true", help="skip the per-model fresh-process load/RSS probe")
    parser.add_argument("--output", default=None, help="output folder (default: device_bench/results/<time>)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _tokenizer_dir(args, models: list[tuple[str, Path]]) -> str | None:
    if args.tokenizer:
        return args.tokenizer
    for _, path in models:
        if (path.parent / "tokenizer.json").is_file() or (path.parent / "tokenizer_config.json").is_file():
            return str(path.parent)
    if args.baselines:  # the baselines' source model has one
        from ..models import default_model_dir

        return str(default_model_dir()) if args.source is None else args.source
    return None


def run(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from ..runtime import model_salr_info

    for name in ("threads", "batch", "prompt_len", "gen_len", "reps"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.models and not args.baselines:
        raise BenchError("give at least one model file, or --baselines")
    providers = _providers(args.provider)
    models = [(default_name(p), _check_onnx(p)) for p in args.models]
    if args.baselines:
        models = ensure_baselines(args.source) + models
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        models = [(f"{i}:{n}", p) for i, (n, p) in enumerate(models)]
    eval_tokens = _eval_tokens(_tokenizer_dir(args, models))
    prompt = None
    profile_dir = tempfile.mkdtemp(prefix="salr-bench-prof-") if args.profile else None

    summaries, sessions = [], []
    for name, path in tqdm(models, desc="load + gate"):
        uses_salr, _ = model_salr_info(path)
        use_library = (False if args.no_library else True) if uses_salr else None
        session = _session(path, providers, args.threads, use_library, profile_dir)
        io = DecoderIO.from_session(session)
        if prompt is None:
            prompt = _prompt(eval_tokens, session, args.prompt_len, args.batch)
        summary = ModelSummary(name=name, path=str(path), file_bytes=file_bytes(path), uses_salr_ops=uses_salr)
        summary.gate = _gate(path, session, io, providers, args.threads, prompt[:1], uses_salr and not args.no_library)
        if not args.no_memory_probe:
            summary.__dict__.update(probe_memory(str(path), providers, args.threads))
        if eval_tokens is not None and args.ppl_windows:
            summary.perplexity = perplexity(session, io, eval_tokens, 512, args.ppl_windows)
        summaries.append(summary)
        sessions.append((session, io))
    timed = [i for i, s in enumerate(summaries) if s.gate["passed"]]
    samples: dict[int, dict[str, list[float]]] = {i: {"prefill": [], "step": [], "tps": []} for i in timed}
    for i in timed:
        for _ in range(args.warmup):
            out = generate_timed(*sessions[i], prompt, args.gen_len)
        summaries[i].greedy_tokens = out["tokens"][0].tolist() if args.warmup else []
    for rep in tqdm(range(args.reps), desc="timed runs"):
        order = timed[rep % len(timed):] + timed[:rep % len(timed)] if timed else []
        for i in order:
            out = generate_timed(*sessions[i], prompt, args.gen_len)
            samples[i]["prefill"].append(out["prefill"])
            samples[i]["step"].extend(out["steps"])
            if out["steps"]:
                samples[i]["tps"].append(args.batch * len(out["steps"]) / sum(out["steps"]))
    records: list[BenchRecord] = []
    for i in timed:
        s, data = summaries[i], samples[i]
        rec_prefill = BenchRecord.from_samples(s.name, "prefill", "s", data["prefill"])
        records.append(rec_prefill)
        s.prefill_seconds = rec_prefill.p50
        s.ttft_seconds = rec_prefill.p50  # the first token comes out of the prefill
        if data["step"]:
            rec_step = BenchRecord.from_samples(s.name, "decode_step", "s", data["step"])
            rec_tps = BenchRecord.from_samples(s.name, "decode_tokens_per_second", "tokens/s", data["tps"])
            records += [rec_step, rec_tps]
            s.decode_token_seconds, s.decode_tokens_per_second = rec_step.p50, rec_tps.p50
    sweep: dict[str, dict[str, float]] = {}
    lengths = [int(x) for x in args.prefill_sweep.split(",") if x.strip()]
    for i in timed if lengths else []:
        sweep[summaries[i].name] = {}
        for n in lengths:
            ids = _prompt(eval_tokens, sessions[i][0], n, args.batch)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                run_step(sessions[i][0], sessions[i][1], ids, None, 0)
                times.append(time.perf_counter() - t)
            sweep[summaries[i].name][str(n)] = float(np.median(times))
    if args.profile:
        for (session, _), s in zip(sessions, summaries):
            s.op_profile = profile_ops(session.end_profiling())
    settings = {k: v for k, v in vars(args).items() if k not in ("models", "verbose")}
    settings["prefill_sweep"] = sweep
    run_record = RunRecord(device=device_description(args.provider), settings=settings, models=summaries,
                           records=records, ort_version=ort.__version__, commit=git_commit(),
                           salr_edge_version=__version__, timestamp=now())
    from .report import markdown, write_all

    out_dir = Path(args.output or Path("device_bench") / "results" / time.strftime("%Y%m%d-%H%M%S"))
    files = write_all(run_record, out_dir)
    print(markdown(run_record))
    print("wrote " + ", ".join(str(f) for f in files))
    failed = [s.name for s in summaries if not s.gate["passed"]]
    if failed:
        print(f"salr-bench: correctness gate FAILED for {', '.join(failed)} (not timed)", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--kernel"]:
        from .bench_salr_linear import main as kernel_main

        return int(kernel_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (BenchError, FileNotFoundError, ValueError) as exc:
        print(f"salr-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
