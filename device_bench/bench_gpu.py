"""GPU benchmark of one SALRLinear layer: Triton and ORT CUDA EP kernels against dense cuBLAS / ORT MatMul.

    python -m salr_edge.device_bench.bench_gpu --out-dir bench_gpu_out

For each weight shape (out x in features) and activation rows M, a random fp16 weight is pruned to the
given sparsity (random mask) and encoded in the bitmap format; then, with fp16 activations:

- PyTorch: Triton `salr_linear_forward` vs cuBLAS dense `torch.matmul(x, Wᵀ)` on the same pruned weight;
- ONNX Runtime (CUDA EP): a one-node com.salr SALRLinear model (libsalr_ops.so built with SALR_CUDA=ON)
  vs a one-node MatMul model with the dense pruned weight, both bound to CUDA buffers (IO binding) and
  running on PyTorch's stream, so one pair of CUDA events brackets each run.

Each output is checked against the dense result before any timing (the bench aborts on a mismatch).
Runs alternate between variants; before each timed run a 256 MiB buffer is overwritten so the weight
comes from DRAM, not L2 (decode-phase layers never find their weight in cache). Medians (and p20/p80)
of --repeats CUDA-event timings are written as JSON and a Markdown table, and the table is printed.
Exits with status 2 and a message when no CUDA device is present. Runs unchanged on a Jetson (JetPack 6
torch and onnxruntime-gpu wheels) or any CUDA machine; the Triton part is skipped when triton is
missing, the ORT part when onnxruntime has no CUDA EP or the library has no CUDA kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

SALR_DOMAIN = "com.salr"
FLUSH_BYTES = 256 << 20


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        out_f, in_f = item.lower().split("x")
        shapes.append((int(out_f), int(in_f)))
    return shapes


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,4096x14336",
                   help="comma-separated OUTxIN weight shapes (default: %(default)s)")
    p.add_argument("--m", default="1,2048", help="comma-separated activation rows (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights pruned (default: %(default)s)")
    p.add_argument("--rank", type=int, default=0, help="adapter rank R of SALRLinear (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=100, help="timed runs per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per variant, autotuning included")
    p.add_argument("--backends", default="triton,ort", help="subset of triton,ort (default: %(default)s)")
    p.add_argument("--library", default=None, help="libsalr_ops.so built with SALR_CUDA=ON (default: the "
                   "installed one, or $SALR_OPS_LIBRARY)")
    p.add_argument("--no-flush", action="store_true", help="do not evict L2 before each timed run")
    p.add_argument("--out-dir", default="bench_gpu_out", help="where bench_gpu.json and bench_gpu.md go")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- data -----------------------------------------------------------------------------------------------

class Layer:
    """One pruned fp16 layer on the GPU: dense copy, bitmap encoding, adapters, activations."""

    def __init__(self, torch, n: int, k: int, m: int, sparsity: float, rank: int, seed: int):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        dev = torch.device("cuda")
        mask = torch.rand((n, k), generator=gen, device=dev) >= sparsity  # (N, K)
        self.w = ((torch.randn((n, k), generator=gen, device=dev) / k**0.5) * mask).half()  # (N, K)
        # The format of DESIGN.md §2, encoded on the GPU (triton, and salr_edge.triton with it, may be absent).
        width = (k + 7) // 8
        bits = torch.zeros((n, width * 8), dtype=torch.int32, device=dev)
        bits[:, :k] = mask.int()
        shifts = torch.arange(8, dtype=torch.int32, device=dev)
        self.bitmap = (bits.view(n, width, 8) << shifts).sum(dim=2).to(torch.uint8)  # (N, ceil(K/8))
        self.values = self.w[mask].contiguous()  # (nnz,) row by row, columns ascending
        self.row_offsets = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        torch.cumsum(mask.sum(dim=1), dim=0, out=self.row_offsets[1:])
        self.a = (torch.randn((rank, k), generator=gen, device=dev) / k**0.5).half()  # (R, K)
        self.b = (torch.randn((n, rank), generator=gen, device=dev) / max(rank, 1) ** 0.5).half()  # (N, R)
        self.x = torch.randn((m, k), generator=gen, device=dev).half()  # (M, K)
        self.n, self.k, self.m, self.rank = n, k, m, rank

    def dense_reference(self, torch):
        y = torch.matmul(self.x.float(), self.w.float().t())  # (M, N)
        if self.rank:
            y += (self.x.float() @ self.a.float().t()) @ self.b.float().t()
        return y

    def salr_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.values, self.row_offsets, self.a, self.b))


def _check(name: str, y, ref) -> float:
    """Max |y - ref| relative to max |ref|; fp16 output rounding and fp32 accumulation stay far below 1e-2."""
    err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if not err < 1e-2:
        raise RuntimeError(f"{name}: output differs from the dense reference (max relative error {err:.3g})")
    return err


# ---- timing ---------------------------------------------------------------------------------------------

class Timer:
    """CUDA-event timing on PyTorch's current stream, with an optional L2 eviction before each run."""

    def __init__(self, torch, flush: bool):
        self.torch = torch
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush else None

    def time(self, fn) -> float:
        torch = self.torch
        if self.flush is not None:
            self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)  # ms


def _interleaved(timer: Timer, variants: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    timer.torch.cuda.synchronize()
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():  # alternate so clock and thermal drift hit every variant alike
            samples[name].append(timer.time(fn))
    return samples


# ---- backends -------------------------------------------------------------------------------------------

def _triton_variants(torch, layer: Layer) -> tuple[dict, dict]:
    from salr_edge.triton import build_group_offsets, salr_linear_forward

    wt = layer.w.t()  # (K, N) view: cuBLAS reads W transposed, no copy
    # Derived at load time, as a model loader would (it also validates the encoding once).
    group_offsets = build_group_offsets(layer.bitmap, layer.row_offsets, layer.values.numel(), layer.k)

    def salr():
        return salr_linear_forward(layer.x, layer.bitmap, layer.values, layer.row_offsets, layer.a, layer.b,
                                   group_offsets=group_offsets)

    def dense():
        y = torch.matmul(layer.x, wt)
        if layer.rank:
            y = y + torch.matmul(torch.matmul(layer.x, layer.a.t()), layer.b.t())
        return y

    ref = layer.dense_reference(torch)
    errors = {"triton SALRLinear": _check("triton SALRLinear", salr(), ref),
              "cuBLAS dense": _check("cuBLAS dense", dense(), ref)}
    return {"triton SALRLinear": salr, "cuBLAS dense": dense}, errors


def _ort_models(layer: Layer):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def model(nodes, inits):
        graph = helper.make_graph(
            nodes, "layer", [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [None, layer.k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [None, layer.n])], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(SALR_DOMAIN, 1)])
        m.ir_version = 8  # readable by ORT 1.21, the oldest runtime the library supports
        return m.SerializeToString()

    host = {name: t.cpu().numpy() for name, t in (("bitmap", layer.bitmap), ("values", layer.values),
                                                  ("row_offsets", layer.row_offsets), ("A_cat", layer.a),
                                                  ("B_cat", layer.b))}
    salr = model([helper.make_node("SALRLinear", ["X", "bitmap", "values", "row_offsets", "A_cat", "B_cat"], ["Y"],
                                   domain=SALR_DOMAIN, in_features=layer.k)],
                 [numpy_helper.from_array(np.ascontiguousarray(a), name) for name, a in host.items()])
    dense_nodes = [helper.make_node("MatMul", ["X", "Wt"], ["Y0" if layer.rank else "Y"])]
    dense_inits = [numpy_helper.from_array(np.ascontiguousarray(layer.w.t().cpu().numpy()), "Wt")]
    if layer.rank:
        dense_nodes += [helper.make_node("MatMul", ["X", "At"], ["H"]), helper.make_node("MatMul", ["H", "Bt"], ["L"]),
                        helper.make_node("Add", ["Y0", "L"], ["Y"])]
        dense_inits += [numpy_helper.from_array(np.ascontiguousarray(host["A_cat"].T), "At"),
                        numpy_helper.from_array(np.ascontiguousarray(host["B_cat"].T), "Bt")]
    return salr, model(dense_nodes, dense_inits)


def _ort_variants(torch, ort, lib: str, layer: Layer) -> tuple[dict, dict]:
    import numpy as np

    stream = torch.cuda.current_stream()
    providers = [("CUDAExecutionProvider", {"device_id": str(torch.cuda.current_device()),
                                            "has_user_compute_stream": "1",
                                            "user_compute_stream": str(stream.cuda_stream)})]
    salr_bytes, dense_bytes = _ort_models(layer)
    variants, errors = {}, {}
    ref = layer.dense_reference(torch)
    for name, model_bytes in (("ORT CUDA SALRLinear", salr_bytes), ("ORT CUDA MatMul", dense_bytes)):
        so = ort.SessionOptions()
        so.register_custom_ops_library(lib)
        # Any node left for the CPU EP would be a silent fallback: fail instead (a library built without CUDA).
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            session = ort.InferenceSession(model_bytes, so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types; the message is what matters
            raise RuntimeError(f"{name}: ORT could not place the model on the CUDA EP ({e}). Is {lib} built with "
                               "SALR_CUDA=ON (SALR_CUDA=ON pip install ., or custom_ops/scripts/build_jetson.sh)?")
        y = torch.empty((layer.m, layer.n), dtype=torch.float16, device="cuda")  # (M, N)
        binding = session.io_binding()
        device = torch.cuda.current_device()
        binding.bind_input("X", "cuda", device, np.float16, list(layer.x.shape), layer.x.data_ptr())
        binding.bind_output("Y", "cuda", device, np.float16, list(y.shape), y.data_ptr())

        def run(session=session, binding=binding):
            session.run_with_iobinding(binding)

        run()
        torch.cuda.synchronize()
        errors[name] = _check(name, y, ref)
        variants[name] = run
    return variants, errors


# ---- report ---------------------------------------------------------------------------------------------

def _markdown(rows: list[dict], device: str) -> str:
    lines = [f"# SALRLinear GPU benchmark ({device})", "",
             "| shape (out x in) | M | variant | p50 ms | p20 ms | p80 ms | speed-up vs dense | GB/s (weights) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['speedup_vs_dense']:.2f}x" if r.get("speedup_vs_dense") else "1.00x (baseline)"
        lines.append(f"| {r['shape']} | {r['m']} | {r['variant']} | {r['p50']:.4f} | {r['p20']:.4f} | {r['p80']:.4f} | "
                     f"{speedup} | {r['weight_gbps']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import torch
    except ImportError:
        print("bench_gpu: PyTorch is not installed; it is needed for CUDA buffers and timing.", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is present (torch.cuda.is_available() is False); this benchmark needs "
              "a CUDA GPU such as a Jetson Orin. Nothing was measured.", file=sys.stderr)
        return 2
    from salr_edge.device_bench.records import BenchRecord, git_commit, now

    backends = {b.strip() for b in args.backends.split(",") if b.strip()}
    device = torch.cuda.get_device_name()
    notes = []
    ort = lib = None
    if "triton" in backends:
        try:
            import triton  # noqa: F401
        except ImportError:
            backends.discard("triton")
            notes.append("triton is not installed: Triton variants skipped")
    if "ort" in backends:
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is None or "CUDAExecutionProvider" not in ort.get_available_providers():
            backends.discard("ort")
            notes.append("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, or the JetPack ORT "
                         "wheel): ORT variants skipped")
        else:
            import os

            from salr_edge.runtime import library_path

            lib = args.library or os.environ.get("SALR_OPS_LIBRARY") or library_path()
    for note in notes:
        print(f"bench_gpu: {note}", file=sys.stderr)
    if not backends:
        print("bench_gpu: no backend left to run.", file=sys.stderr)
        return 2

    timer = Timer(torch, flush=not args.no_flush)
    rows = []
    for n, k in _parse_shapes(args.shapes):
        for m in (int(v) for v in args.m.split(",")):
            layer = Layer(torch, n, k, m, args.sparsity, args.rank, args.seed)
            groups = []
            if "triton" in backends:
                groups.append(_triton_variants(torch, layer))
            if "ort" in backends:
                groups.append(_ort_variants(torch, ort, lib, layer))
            for variants, errors in groups:
                samples = _interleaved(timer, variants, args.warmup, args.repeats)
                dense_name = next(name for name in variants if "dense" in name or "MatMul" in name)
                dense_p50 = BenchRecord.from_samples(f"{n}x{k}", dense_name, "ms", samples[dense_name]).p50
                for name, times in samples.items():
                    rec = BenchRecord.from_samples(f"{n}x{k}", f"{name} M={m}", "ms", times)
                    weight_bytes = layer.salr_bytes() if "SALR" in name else layer.w.numel() * 2
                    rows.append({**rec.__dict__, "shape": f"{n}x{k}", "m": m, "variant": name,
                                 "max_rel_error": errors[name],
                                 "speedup_vs_dense": None if name == dense_name else dense_p50 / rec.p50,
                                 "weight_bytes": weight_bytes, "weight_gbps": weight_bytes / rec.p50 / 1e6})
                print(f"{n}x{k} M={m}: " + ", ".join(f"{r['variant']} {r['p50']:.4f} ms" for r in rows[-len(samples):]),
                      flush=True)
            del layer
            torch.cuda.empty_cache()

    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": {"gpu": device, "capability": list(torch.cuda.get_device_capability()),
                         "machine": platform.machine()},
              "settings": {**vars(args), "backends": sorted(backends)}, "notes": notes,
              "versions": {"torch": torch.__version__, "triton": version("triton"),
                           "onnxruntime": version("onnxruntime-gpu") or version("onnxruntime"),
                           "salr_edge": version("salr-edge")},
              "library": lib, "commit": git_commit(), "timestamp": now(), "records": rows}
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=2))
    table = _markdown(rows, device)
    (out / "bench_gpu.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
