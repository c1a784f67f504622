"""Runs the Triton kernels for tests/custom_ops/test_triton.py in a process of its own.

TRITON_INTERPRET must be set before triton is first imported, and the pytest process may already have
imported triton without it; this worker is started with the variable set, reads the cases and inputs the
test wrote, and writes the kernels' outputs (float32) and the error messages of the invalid-input cases.

    TRITON_INTERPRET=1 python tests/custom_ops/triton_worker.py CASES.json INPUTS.npz OUTPUTS.npz ERRORS.json

A second mode compiles the kernels ahead of time for a GPU architecture (no GPU needed; TRITON_INTERPRET
must be unset so the GPU autotune configs are used) and writes what the compiler produced:

    python tests/custom_ops/triton_worker.py compile 87 REPORT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _main(cases_path: str, inputs_path: str, outputs_path: str, errors_path: str) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("triton_worker: TRITON_INTERPRET=1 must be set before triton is imported", file=sys.stderr)
        return 2
    import torch

    from salr_edge import kernels
    from salr_edge.modules.sparse_lowrank_linear import SparseLowRankLinear

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    cases = json.loads(open(cases_path).read())
    data = np.load(inputs_path)
    outputs: dict[str, np.ndarray] = {}

    def t(case_id: str, name: str, dtype: str | None = None) -> torch.Tensor:
        tensor = torch.from_numpy(data[f"{case_id}/{name}"].copy())
        return tensor.to(dtypes[dtype]) if dtype else tensor

    for case in cases:
        cid, op = case["id"], case["op"]
        xdt, vdt = case["dtype"], case.get("values_dtype", case["dtype"])
        start = time.perf_counter()
        if op == "salr":
            bias = t(cid, "bias", xdt) if case["bias"] else None
            y = kernels.salr_linear_forward(t(cid, "x", xdt), t(cid, "bitmap"), t(cid, "values", vdt),
                                            t(cid, "row_offsets"), t(cid, "a_cat", xdt), t(cid, "b_cat", xdt), bias)
        elif op == "fag":
            y = kernels.fused_adapter_gemm_forward(t(cid, "x", xdt), t(cid, "a_cat", xdt), t(cid, "b_cat", xdt))
        elif op == "decode":
            y = kernels.bitmap_decode_forward(t(cid, "bitmap"), t(cid, "values", vdt), t(cid, "row_offsets"),
                                              case["k"])
        elif op == "module":
            dense = t(cid, "dense", xdt)  # (N, K), zeros at pruned positions
            linear = torch.nn.Linear(case["k"], case["n"], bias=True, dtype=dtypes[xdt])
            with torch.no_grad():
                linear.weight.copy_(dense)
                linear.bias.copy_(t(cid, "bias", xdt))
            module = SparseLowRankLinear(linear, t(cid, "mask").bool())
            module.add_adapter("lora", t(cid, "a_cat", xdt), t(cid, "b_cat", xdt), scaling=0.5)
            x = t(cid, "x", xdt)
            # With trainable adapters and grad enabled the kernel has no backward: the torch path must run.
            outputs[f"{cid}/grad_path_is_torch"] = np.array(kernels.sparse_lowrank_forward(module, x) is None)
            with torch.no_grad():
                y = kernels.sparse_lowrank_forward(module, x)
                outputs[f"{cid}/torch"] = module(x).float().numpy()  # CPU input: the module's torch path
                module.merge()
                outputs[f"{cid}/merged_is_torch"] = np.array(kernels.sparse_lowrank_forward(module, x) is None)
        else:
            raise ValueError(f"unknown op {op!r} in case {cid}")
        outputs[f"{cid}/y"] = y.float().numpy()
        print(f"{cid}: {time.perf_counter() - start:.2f} s", file=sys.stderr)

    np.savez(outputs_path, **outputs)
    with open(errors_path, "w") as f:
        json.dump(_invalid_input_messages(kernels, torch), f)
    return 0


def _invalid_input_messages(kernels, torch) -> dict[str, str]:
    """The ValueError message of each malformed call (or "no error")."""
    k, n = 20, 6
    dense = torch.zeros(n, k, dtype=torch.float16)
    dense[:, ::3] = 1.0
    bitmap, values, offsets = kernels.encode_on_device(dense, dense != 0)
    x = torch.ones(2, k, dtype=torch.float16)
    wide = torch.ones(3, 30, dtype=torch.float16)  # K = 30 needs 4 bitmap bytes per row, the bitmap has 3
    a = torch.ones(3, k, dtype=torch.float16)
    b = torch.ones(n, 3, dtype=torch.float16)
    bad_offsets = offsets.clone()
    bad_offsets[2:4] = offsets[2:4].flip(0)  # [.., 21, 14, ..]: decreasing at row 2
    shifted = offsets.clone()
    shifted[1:-1] += 1  # every row boundary moves: popcounts no longer match
    padded = bitmap.clone()
    padded[0, -1] |= 0x80  # a bit past in_features = 20
    calls = {
        "x_dtype": lambda: kernels.salr_linear_forward(x.to(torch.int32), bitmap, values, offsets, a, b),
        "bitmap_width": lambda: kernels.salr_linear_forward(wide, bitmap, values, offsets, wide[:3], b),
        "a_cat_shape": lambda: kernels.salr_linear_forward(x, bitmap, values, offsets, a[:, :5], b),
        "b_cat_shape": lambda: kernels.salr_linear_forward(x, bitmap, values, offsets, a, b[:, :2]),
        "a_cat_dtype": lambda: kernels.salr_linear_forward(x, bitmap, values, offsets, a.float(), b),
        "bias_shape": lambda: kernels.salr_linear_forward(x, bitmap, values, offsets, a, b, torch.ones(n + 1).half()),
        "offsets_dtype": lambda: kernels.salr_linear_forward(x, bitmap, values, offsets.int(), a, b),
        "offsets_decreasing": lambda: kernels.salr_linear_forward(x, bitmap, values, bad_offsets, a, b),
        "offsets_end": lambda: kernels.salr_linear_forward(x, bitmap, values[:-1], offsets, a, b),
        "popcount": lambda: kernels.salr_linear_forward(x, bitmap, values, shifted, a, b),
        "padding_bits": lambda: kernels.salr_linear_forward(x, padded, values, offsets, a, b),
        "fag_b_shape": lambda: kernels.fused_adapter_gemm_forward(x, a, b.T.contiguous()),
        "decode_values_rank": lambda: kernels.bitmap_decode_forward(bitmap, values.view(1, -1), offsets, k),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = "no error"
        except ValueError as e:
            messages[name] = str(e)
    return messages


def _compile(capability: int, report_path: str) -> int:
    """Compiles each kernel with its first GPU autotune config for sm_<capability>, like the JIT would."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_worker compile: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from salr_edge.triton import salr_linear as sl

    fp = "*fp16"
    bitmap = {"bitmap_ptr": "*u8", "values_ptr": fp, "row_offsets_ptr": "*i64", "group_offsets_ptr": "*i32",
              "W_BYTES": "i32", "N_GROUPS": "i32"}
    adapter = {"h_ptr": fp, "b_ptr": fp, "R": "i32", "stride_hm": "i32", "stride_bn": "i32", "bias_ptr": fp,
               "M_BUCKET": "i32"}
    linear_consts = {"HAS_BIAS": True, "DOT_PRECISION": "tf32", "DOT_UPCAST": False, "BLOCK_R": 32}
    kernels = {
        "salr_linear": (sl._salr_linear_kernel.fn, sl.get_autotune_config()[0], {
            "x_ptr": fp, "y_ptr": fp, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
            **bitmap, **adapter}, linear_consts),
        "salr_gemv": (sl._salr_gemv_kernel.fn, sl.get_gemv_autotune_config()[0], {
            "x_ptr": fp, "acc_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
            "stride_am": "i32", **bitmap, **adapter}, linear_consts),
        "dense_nt": (sl._dense_nt_kernel.fn, sl.get_dense_autotune_config()[2], {
            "a_ptr": fp, "b_ptr": fp, "c_ptr": fp, "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32",
            "stride_bn": "i32", "stride_cm": "i32", "M_BUCKET": "i32"}, {"DOT_PRECISION": "tf32", "DOT_UPCAST": False}),
        "bitmap_decode": (sl._bitmap_decode_kernel, triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}), {
            **bitmap, "out_ptr": fp, "N": "i32", "K": "i32"}, {}),
    }
    report = {}
    for name, (fn, config, signature, consts) in kernels.items():
        constexprs = {**consts, **config.kwargs}
        signature = {**signature, **{key: "constexpr" for key in constexprs}}
        names = list(signature)
        # The JIT marks pointers and ints divisible by 16 (real shapes such as 4096 are); without the hint
        # no load is vectorised and the pipeliner has nothing to turn into cp.async.
        hinted = [arg for arg, kind in signature.items() if kind != "constexpr" and (
            kind.startswith("*") or arg.startswith("stride") or arg in ("N", "K", "W_BYTES"))]
        attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in hinted}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        start = time.perf_counter()
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        report[name] = {"shared_bytes": compiled.metadata.shared, "num_stages": config.num_stages,
                        "async_copies": ttgir.count("async_copy_global_to_local"),
                        "tensor_core": "mma" in ptx, "seconds": round(time.perf_counter() - start, 2)}
    with open(report_path, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "compile":
        sys.exit(_compile(int(sys.argv[2]), sys.argv[3]))
    sys.exit(_main(*sys.argv[1:5]))
