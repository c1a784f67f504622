"""Benchmark one SALRLinear node (libsalr_ops.so, CPU EP) against ORT's own dense fp32 MatMul and int4 MatMulNBits.

    python device_bench/bench_salr_linear.py --shapes 4096x4096 --m 1 --sparsity 0.5,0.7,2:4 --threads 1,2

For each configuration (out x in features, activation rows M, sparsity, threads, values dtype, adapter rank):
- the same random weight is pruned (random mask, or 2:4) and encoded in the bitmap format; the dense
  baseline is that pruned weight as an fp32 MatMul initializer, and the int4 baseline is the dense model
  through `MatMulNBitsQuantizer` (block 32, symmetric, accuracy_level=4);
- outputs are checked before any timing (SALRLinear against the dense baseline, which computes the same
  function; int4's error is reported, not gated);
- each variant runs as several sessions built from the same model bytes, each owning a separate copy of
  its weights, together >= --rotate-mib of weights, and successive runs rotate through them, so weights
  stream from DRAM as in a real decoder instead of sitting in the 32 MiB L3;
- variants alternate run by run (dense, SALR, int4, dense, ...) so drifting machine load hits all alike;
  the medians (and p20/p80) of --repeats runs per variant are reported;
- with adapters (rank > 0), the same SALR weight without adapters runs as a fourth variant in the same
  rotation, and the adapters' cost is the ratio of the two medians: run-to-run drift on a shared machine is
  larger than that cost, so separate runs of rank 0 and rank R cannot measure it;
- every session disables intra-op spinning: an idle pool that spins after its run steals a core from the
  next session's run (DESIGN.md section 5's benchmark pitfall).

Writes JSON (one record per configuration) and a Markdown table; prints the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from salr_edge.io_utils import atomic_write_text

SALR_DOMAIN = "com.salr"


def _library_path(explicit: str | None) -> str:
    """--library, else $SALR_OPS_LIBRARY, else the installed copy; FileNotFoundError names what is missing."""
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"--library {explicit} does not exist")
        return explicit
    from salr_edge.runtime import library_path

    return library_path()


def _encode(mask: np.ndarray, w: np.ndarray, vdt):
    n, k = w.shape
    width = (k + 7) // 8
    padded = np.zeros((n, width * 8), dtype=bool)
    padded[:, :k] = mask
    bitmap = np.packbits(padded, axis=1, bitorder="little").reshape(n, width)
    values = w[mask].astype(vdt)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=offsets[1:])
    return bitmap, values, offsets


def _mask(rng, n, k, sparsity: str) -> np.ndarray:
    if sparsity == "2:4":
        keep = np.argsort(rng.random((n, k // 4, 4)), axis=2)[:, :, :2]
        mask = np.zeros((n, k // 4, 4), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=2)
        return mask.reshape(n, k)
    return rng.random((n, k)) >= float(sparsity)


QUANTIZED_BITS = {"int8": 8, "int4": 4}


def _quantize(values: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored integers, fp16 scales, dequantized fp32 values) of bitmap format v2."""
    import torch

    from salr_edge.formats.quantize import dequantize_values, quantize_values

    stored, scales = quantize_values(torch.from_numpy(values), bits, group_size)
    deq = dequantize_values(stored, scales, bits, group_size, nnz=values.size)
    return stored.numpy(), scales.numpy(), deq.numpy()


def _models(n, k, m, sparsity, values_kind, rank, seed, group_size=32):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    mask = _mask(rng, n, k, sparsity)
    bits = QUANTIZED_BITS.get(values_kind)
    vdt = np.float32 if bits else np.dtype(values_kind).type
    bitmap, values, offsets = _encode(mask, w, vdt)
    if bits:
        values, scales, deq = _quantize(values, bits, group_size)
        w_pruned = np.zeros_like(w)
        w_pruned[mask] = deq  # exactly what SALRLinearQ multiplies by
    else:
        w_pruned = np.where(mask, w, 0).astype(vdt).astype(np.float32)  # exactly what SALRLinear multiplies by
    # fp16-valued adapters in fp32 tensors: what an exported model's Cast(fp16 -> fp32) of its stored adapters
    # gives the kernel (ORT folds the Cast), so the kernel takes the same adapter path as in a real model
    a = (rng.standard_normal((rank, k)) / np.sqrt(k)).astype(np.float16).astype(np.float32)
    b = (rng.standard_normal((n, rank)) * 0.1).astype(np.float16).astype(np.float32)
    opsets = [helper.make_opsetid("", 17)]

    x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])
    y_info = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
    dense_w = w_pruned + (b @ a if rank else 0)  # the dense model computes the same function, adapter folded in
    dense = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["X", "Wt"], ["Y"])], "dense", [x_info], [y_info],
                          [numpy_helper.from_array(np.ascontiguousarray(dense_w.T), "Wt")]),
        opset_imports=opsets)
    dense.ir_version = 8
    weight = [(bitmap, "bitmap"), (values, "values"), (offsets, "row_offsets")] + ([(scales, "scales")] if bits else [])
    inits = [numpy_helper.from_array(t, name) for t, name in weight + [(a, "A_cat"), (b, "B_cat")]]
    names = ["X"] + [name for _, name in weight] + ["A_cat", "B_cat"]
    if bits:
        node = helper.make_node("SALRLinearQ", names, ["Y"], domain=SALR_DOMAIN, in_features=k, bits=bits,
                                group_size=group_size)
    else:
        node = helper.make_node("SALRLinear", names, ["Y"], domain=SALR_DOMAIN, in_features=k)
    salr = helper.make_model(helper.make_graph([node], "salr", [x_info], [y_info], inits),
                             opset_imports=opsets + [helper.make_opsetid(SALR_DOMAIN, 1)])
    salr.ir_version = 8
    salr_bytes = sum(t.nbytes for t, _ in weight) + (a.size + b.size) * 2  # adapters as stored: fp16
    return dense, salr, salr_bytes, dense_w


def _int4(dense_model):
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(dense_model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    model = q.model.model
    nbytes = sum(np.prod(t.dims) * (1 if t.data_type in (2, 3) else 2 if t.data_type == 10 else 4)
                 for t in model.graph.initializer)
    return model, int(nbytes)


class _Variant:
    """Sessions sharing one model, each with its own weight copy; run() rotates through them."""

    def __init__(self, ort, name, model_bytes, weight_bytes, threads, lib, x, rotate_bytes, spin, max_copies):
        self.name = name
        self.copies = min(max_copies, max(1, int(np.ceil(rotate_bytes / max(weight_bytes, 1)))))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if lib:
            so.register_custom_ops_library(lib)
        self.sessions, self.bindings, self.outputs = [], [], []
        for _ in range(self.copies):
            s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
            out = np.empty((x.shape[0], s.get_outputs()[0].shape[1]), dtype=np.float32)
            bind = s.io_binding()
            bind.bind_cpu_input("X", x)
            bind.bind_output("Y", "cpu", 0, np.float32, out.shape, out.ctypes.data)
            self.sessions.append(s)
            self.bindings.append(bind)
            self.outputs.append(out)
        self.i = 0
        self.times = []

    def output(self):
        self.sessions[0].run_with_iobinding(self.bindings[0])
        return self.outputs[0].copy()

    def run(self):
        i = self.i
        self.i = (i + 1) % self.copies
        t0 = time.perf_counter_ns()
        self.sessions[i].run_with_iobinding(self.bindings[i])
        self.times.append((time.perf_counter_ns() - t0) / 1e6)

    def stats(self):
        q = statistics.quantiles(self.times, n=10)
        return {"p20_ms": q[1], "p50_ms": statistics.median(self.times), "p80_ms": q[7]}


def bench_config(ort, lib, n, k, m, sparsity, threads, values_kind, rank, repeats, rotate_mib, spin, max_copies=64,
                 seed=0, group_size=32):
    dense_model, salr_model, salr_bytes, w_eff = _models(n, k, m, sparsity, values_kind, rank, seed, group_size)
    dense_bytes = dense_model.SerializeToString()  # before quantizing: the quantizer rewrites its input in place
    int4_model, int4_bytes = _int4(dense_model)
    x = np.random.default_rng(seed + 1).standard_normal((m, k)).astype(np.float32)
    rotate = rotate_mib * 2**20
    variants = [
        _Variant(ort, "dense_fp32", dense_bytes, n * k * 4, threads, None, x, rotate, spin, max_copies),
        _Variant(ort, "salr", salr_model.SerializeToString(), salr_bytes, threads, lib, x, rotate, spin, max_copies),
        _Variant(ort, "int4", int4_model.SerializeToString(), int4_bytes, threads, None, x, rotate, spin, max_copies),
    ]
    functions = {v.name: w_eff for v in variants}
    if rank:  # the same weight (drawn before the adapters from the same seed) without them
        _, base_model, base_bytes, w_base = _models(n, k, m, sparsity, values_kind, 0, seed, group_size)
        variants.append(_Variant(ort, "salr_no_adapter", base_model.SerializeToString(), base_bytes, threads, lib,
                                 x, rotate, spin, max_copies))
        functions["salr_no_adapter"] = w_base
    # Correctness gate before timing: SALRLinear computes the same function as the dense baseline.
    errs = {}
    for v in variants:
        w = functions[v.name].T.astype(np.float64)
        ref = x.astype(np.float64) @ w
        scale = np.abs(x.astype(np.float64)) @ np.abs(w)
        errs[v.name] = float(np.max(np.abs(v.output() - ref) / (scale + 1e-12)))
    # the integer path (quantized values, 2:4, batch 1) also rounds the activations to int8 per 32 columns
    salr_tolerance = 2e-2 if values_kind in QUANTIZED_BITS else 1e-5
    if (max(errs.get("salr_no_adapter", 0.0), errs["salr"]) > salr_tolerance) or errs["dense_fp32"] > 1e-5:
        raise RuntimeError(f"output check failed before timing: relative errors {errs}")
    for _ in range(max(3, repeats // 10)):  # warm-up: page in every copy, settle the pools
        for v in variants:
            for _ in range(v.copies):
                v.run()
    for v in variants:
        v.times.clear()
    for _ in range(repeats):
        for v in variants:
            v.run()
    st = {v.name: v.stats() for v in variants}
    adapters = {}
    if rank:
        adapters = {"salr_no_adapter": st["salr_no_adapter"], "weight_bytes_no_adapter": base_bytes,
                    "adapter_cost": st["salr"]["p50_ms"] / st["salr_no_adapter"]["p50_ms"] - 1.0}
    return {
        "out_features": n, "in_features": k, "m": m, "sparsity": sparsity, "threads": threads,
        "values_dtype": values_kind, "group_size": group_size if values_kind in QUANTIZED_BITS else None,
        "rank": rank, "repeats": repeats,
        "copies": {v.name: v.copies for v in variants},
        "rotated_mib": {v.name: v.copies * b / 2**20 for v, b in zip(variants, (n * k * 4, salr_bytes, int4_bytes))},
        "weight_bytes": {"dense_fp32": n * k * 4, "salr": salr_bytes, "int4": int4_bytes},
        "rel_error_vs_dense": errs,
        "dense_fp32": st["dense_fp32"], "salr": st["salr"], "int4": st["int4"],
        "speedup_vs_dense": st["dense_fp32"]["p50_ms"] / st["salr"]["p50_ms"],
        "speedup_vs_int4": st["int4"]["p50_ms"] / st["salr"]["p50_ms"],
        **adapters,
    }


def _markdown(records) -> str:
    lines = ["| shape (N x K) | M | sparsity | values | rank | threads | dense fp32 ms | SALR ms | int4 ms "
             "| SALR vs dense | SALR vs int4 | SALR MB | int4 MB | adapter cost |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cost = f"{100 * r['adapter_cost']:+.1f}%" if "adapter_cost" in r else "-"
        lines.append(
            f"| {r['out_features']}x{r['in_features']} | {r['m']} | {r['sparsity']} | {r['values_dtype']} | "
            f"{r['rank']} | {r['threads']} | {r['dense_fp32']['p50_ms']:.3f} | {r['salr']['p50_ms']:.3f} | "
            f"{r['int4']['p50_ms']:.3f} | {r['speedup_vs_dense']:.2f}x | {r['speedup_vs_int4']:.2f}x | "
            f"{r['weight_bytes']['salr'] / 1e6:.1f} | {r['weight_bytes']['int4'] / 1e6:.1f} | {cost} |")
    return "\n".join(lines)


def _csv(s, conv=str):
    return [conv(v) for v in s.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,576x1536,1536x576", help="N x K (out x in features), comma list")
    p.add_argument("--m", default="1,8,128", help="activation rows, comma list")
    p.add_argument("--sparsity", default="0.5,0.7,2:4", help="fractions pruned, or 2:4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--values", default="float16", help="values dtype(s): float16,float32,int8,int4")
    p.add_argument("--group-size", type=int, default=32, help="non-zeros per scale for int8/int4 values")
    p.add_argument("--rank", default="0", help="adapter rank(s) R")
    p.add_argument("--repeats", type=int, default=100, help="timed runs per variant")
    p.add_argument("--rotate-mib", type=int, default=256, help="weight bytes each variant rotates through")
    p.add_argument("--max-copies", type=int, default=64,
                   help="cap on sessions per variant (small layers: the cap, not --rotate-mib, sets the bytes)")
    p.add_argument("--spin", action="store_true", help="let ORT's intra-op threads spin (off: see docstring)")
    p.add_argument("--library", default=None, help="libsalr_ops.so (default: $SALR_OPS_LIBRARY / installed)")
    p.add_argument("--out", default="device_bench/results/bench_salr_linear", help="output path prefix")
    args = p.parse_args(argv)

    import onnxruntime as ort

    try:
        lib = _library_path(args.library)
    except FileNotFoundError as e:
        p.error(str(e))
    records = []
    for shape in _csv(args.shapes):
        n, k = (int(v) for v in shape.lower().split("x"))
        for m in _csv(args.m, int):
            for sparsity in _csv(args.sparsity):
                for vname in _csv(args.values):
                    for rank in _csv(args.rank, int):
                        for threads in _csv(args.threads, int):
                            rec = bench_config(ort, lib, n, k, m, sparsity, threads, vname, rank, args.repeats,
                                               args.rotate_mib, args.spin, args.max_copies,
                                               group_size=args.group_size)
                            records.append(rec)
                            print(_markdown([rec]).splitlines()[-1], flush=True)
    meta = {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(), "onnxruntime": ort.__version__,
            "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "library": lib, "kernels": os.environ.get("SALR_KERNELS", "best"), "argv": sys.argv if argv is None else argv}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "records": records}, indent=1))
    table = _markdown(records)
    atomic_write_text(out.with_suffix(".md"), f"# SALRLinear vs dense fp32 MatMul vs int4 MatMulNBits\n\n"
                      f"ORT {ort.__version__}, {meta['cpus']} CPUs, medians of {args.repeats} runs, weights "
                      f"rotated through >= {args.rotate_mib} MiB.\n\n{table}\n")
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
