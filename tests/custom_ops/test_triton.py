"""Triton kernels (salr_edge.kernels) vs the NumPy references, on CPU through TRITON_INTERPRET=1.

TRITON_INTERPRET is read when triton is imported, and this pytest process may have imported triton
without it (another test, a plugin). So the kernels run in one subprocess started with the variable set
(tests/custom_ops/triton_worker.py): this module writes every case's inputs, the worker writes the
outputs, and each case is then checked here against `ReferenceEvaluator(..., new_ops=REFERENCE_OPS)`.
The interpreter runs every program instance in Python, so shapes stay small except one K = 545,
N = 830 layer at M = 1.

The interpreter checks semantics only; `test_kernels_compile_for_jetson_and_hopper` also lowers every
kernel to sm_87 and sm_90 machine code (no GPU needed). The module takes under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
from onnx import helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from .reference import (  # noqa: E402
    BITMAP_DECODE,
    FUSED_ADAPTER_GEMM,
    IN_FEATURES_ATTR,
    OPSET_VERSION,
    REFERENCE_OPS,
    SALR_DOMAIN,
    SALR_LINEAR,
    encode_bitmap,
)

WORKER = Path(__file__).with_name("triton_worker.py")
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Error allowed between a kernel and the float64 reference, per output dtype:
#   |y - ref| <= SCALE_TOL * scale + REL_TOL * |ref|,  scale = |X| |W|^T + (|X| |A|^T) |B|^T + |bias|.
# - Accumulation is fp32 in the kernels' own blocked order: worst case ~K * 2^-24 * scale, and for random
#   signs far less; fp32 outputs get SCALE_TOL = 1e-5 (DOT_PRECISION="ieee", no TF32).
# - H = X·A_catᵀ is stored in the activation dtype between the two adapter GEMMs (as torch's fp16
#   F.linear chain does): its rounding costs up to one unit roundoff u of (|X| |A|^T) |B|^T, which is
#   bounded by scale, so SCALE_TOL = u; u = 2^-11 (fp16), 2^-8 (bf16), ~6e-8 (fp32, inside the 1e-5).
# - The output is rounded once from fp32 to its dtype: REL_TOL = 2u (u for the rounding, u of margin).
# Inputs are generated already rounded to their dtypes, so no tolerance is spent on them.
TOLERANCES = {
    "float32": {"SCALE_TOL": 1e-5, "REL_TOL": 0.0},
    "float16": {"SCALE_TOL": 2.0**-11 + 1e-5, "REL_TOL": 2 * 2.0**-11},
    "bfloat16": {"SCALE_TOL": 2.0**-8 + 1e-5, "REL_TOL": 2 * 2.0**-8},
}

# Cases: (N, K) = (830, 545) and every other shape is a multiple of neither 8 nor the 32/64-wide tiles;
# M = 1 and 7 take the split-K kernel, M = 64 the tiled one; "special" masks add all-zero tiles, empty
# rows and fully dense rows (also in the last, padded bitmap byte).
CASES = [
    dict(id="salr-m1-830x545-fp16", op="salr", m=1, n=830, k=545, r=8, dtype="float16", bias=True, mask="random"),
    dict(id="salr-m7-fp16", op="salr", m=7, n=70, k=100, r=5, dtype="float16", bias=True, mask="random"),
    dict(id="salr-m64-fp16-3d", op="salr", m=64, n=70, k=100, r=5, dtype="float16", bias=True, mask="random",
         x_shape=(2, 32, 100)),
    dict(id="salr-m64-special-fp16", op="salr", m=64, n=70, k=203, r=4, dtype="float16", bias=False,
         mask="special"),
    dict(id="salr-m7-special-fp16-r0", op="salr", m=7, n=70, k=203, r=0, dtype="float16", bias=True,
         mask="special"),
    dict(id="salr-m64-bf16-r0", op="salr", m=64, n=33, k=77, r=0, dtype="bfloat16", bias=False, mask="random"),
    dict(id="salr-m7-bf16", op="salr", m=7, n=33, k=77, r=3, dtype="bfloat16", bias=True, mask="random"),
    dict(id="salr-m64-fp32-fp16values", op="salr", m=64, n=50, k=130, r=3, dtype="float32",
         values_dtype="float16", bias=True, mask="random"),
    dict(id="salr-m1-fp32", op="salr", m=1, n=50, k=130, r=6, dtype="float32", bias=False, mask="special"),
    dict(id="fag-m64-fp16", op="fag", m=64, n=40, k=70, r=12, dtype="float16"),
    dict(id="fag-m1-fp32", op="fag", m=1, n=40, k=70, r=12, dtype="float32"),
    dict(id="fag-r0-fp16", op="fag", m=7, n=40, k=70, r=0, dtype="float16"),
    dict(id="decode-fp16-special", op="decode", n=33, k=545, dtype="float16", mask="special"),
    dict(id="decode-bf16", op="decode", n=20, k=77, dtype="bfloat16", mask="random"),
    dict(id="module-m7-fp16", op="module", m=7, n=70, k=100, r=5, dtype="float16", mask="random"),
    dict(id="module-m64-fp32-3d", op="module", m=64, n=70, k=100, r=5, dtype="float32", mask="special",
         x_shape=(4, 16, 100)),
]


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` rounded to `dtype` and held in float32 (exact: every fp16/bf16 value is an fp32 value)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(TORCH_DTYPES[dtype]).float().numpy()


def _mask(rng, n, k, kind):
    mask = rng.random((n, k)) < 0.5
    if kind == "special":
        mask[: min(n, 40), 64:128] = False  # all-zero 64-wide tiles
        mask[0] = False
        mask[1] = True  # fully dense rows, padding byte included
        mask[n // 2] = True
        mask[-1] = False
    return mask


def _inputs(case, rng):
    n, k, dtype = case["n"], case["k"], case["dtype"]
    vdt = case.get("values_dtype", dtype)
    arrays = {}
    if case["op"] in ("salr", "decode", "module"):
        mask = _mask(rng, n, k, case["mask"])
        dense = _round(rng.standard_normal((n, k)) / np.sqrt(k), vdt) * mask
        bitmap, values, offsets = encode_bitmap(dense, mask, np.float32)
        arrays.update(bitmap=bitmap, values=values, row_offsets=offsets, dense=dense, mask=mask.astype(np.uint8))
    if case["op"] != "decode":
        r = case["r"]
        arrays["x"] = _round(rng.standard_normal(case.get("x_shape", (case["m"], k))), dtype)
        arrays["a_cat"] = _round(rng.standard_normal((r, k)) / np.sqrt(k), dtype)
        arrays["b_cat"] = _round(rng.standard_normal((n, r)) / np.sqrt(max(r, 1)), dtype)  # B != 0
        arrays["bias"] = _round(rng.standard_normal(n), dtype)
    return arrays


def _reference(op_type, feeds, attrs):
    """Run the shared NumPy reference of `op_type` on float32 feeds (computed in float64)."""
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape)
              for name, arr in feeds.items()]
    node = helper.make_node(op_type, list(feeds), ["Y"], domain=SALR_DOMAIN, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(SALR_DOMAIN, OPSET_VERSION)])
    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)[0].astype(np.float64)


def _expected(case, arrays):
    """(reference output, error scale) in float64."""
    if case["op"] == "decode":
        ref = _reference(BITMAP_DECODE, {k: arrays[k] for k in ("bitmap", "values", "row_offsets")},
                         {IN_FEATURES_ATTR: case["k"]})
        return ref, np.zeros_like(ref)
    x = arrays["x"].astype(np.float64).reshape(-1, case["k"])  # (M, K)
    a, b = arrays["a_cat"].astype(np.float64), arrays["b_cat"].astype(np.float64)
    scale = (np.abs(x) @ np.abs(a).T) @ np.abs(b).T  # (M, N)
    if case["op"] == "fag":
        ref = _reference(FUSED_ADAPTER_GEMM, {k: arrays[k] for k in ("x", "a_cat", "b_cat")}, {})
        return ref.reshape(x.shape[0], -1), scale
    b_eff = arrays["b_cat"] * (0.5 if case["op"] == "module" else 1.0)  # the worker's adapter scaling
    feeds = {"X": arrays["x"], "bitmap": arrays["bitmap"], "values": arrays["values"],
             "row_offsets": arrays["row_offsets"], "A_cat": arrays["a_cat"], "B_cat": b_eff.astype(np.float32)}
    with_bias = case["op"] == "module" or case["bias"]
    if with_bias:
        feeds["bias"] = arrays["bias"]
        scale = scale + np.abs(arrays["bias"].astype(np.float64))
    ref = _reference(SALR_LINEAR, feeds, {IN_FEATURES_ATTR: case["k"]}).reshape(x.shape[0], -1)
    return ref, scale + np.abs(x) @ np.abs(arrays["dense"].astype(np.float64)).T


def _assert_close(y, ref, scale, dtype):
    tol = TOLERANCES[dtype]
    y = y.astype(np.float64).reshape(ref.shape)
    err = np.abs(y - ref)
    bound = tol["SCALE_TOL"] * scale + tol["REL_TOL"] * np.abs(ref) + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), f"max err/bound = {(err / bound).max():.3g} at {worst}: y={y[worst]} ref={ref[worst]}"


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Runs every case through the interpreted kernels once; returns (inputs, outputs, error messages)."""
    tmp = tmp_path_factory.mktemp("triton")
    rng = np.random.default_rng(0)
    inputs = {case["id"]: _inputs(case, rng) for case in CASES}
    (tmp / "cases.json").write_text(json.dumps(CASES))
    np.savez(tmp / "inputs.npz", **{f"{cid}/{name}": arr for cid, arrays in inputs.items()
                                    for name, arr in arrays.items()})
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp / "cases.json"), str(tmp / "inputs.npz"),
                           str(tmp / "outputs.npz"), str(tmp / "errors.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"triton worker failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    outputs = dict(np.load(tmp / "outputs.npz"))
    return inputs, outputs, json.loads((tmp / "errors.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernel_matches_reference(interpreted, case):
    inputs, outputs, _ = interpreted
    arrays = inputs[case["id"]]
    ref, scale = _expected(case, arrays)
    y = outputs[f"{case['id']}/y"]
    if case["op"] == "decode":
        np.testing.assert_array_equal(y, ref)  # decoding moves values; any difference is a wrong index
        return
    expected_shape = (*case.get("x_shape", (case["m"], case["k"]))[:-1], case["n"])
    assert y.shape == expected_shape
    _assert_close(y, ref, scale, case["dtype"])


@pytest.mark.parametrize("case", [c for c in CASES if c["op"] == "module"], ids=lambda c: c["id"])
def test_module_backend_switch(interpreted, case):
    """The Triton path of SparseLowRankLinear agrees with its torch path and steps aside when it must."""
    inputs, outputs, _ = interpreted
    cid = case["id"]
    assert outputs[f"{cid}/grad_path_is_torch"], "with autograd recording, the torch path must run"
    assert outputs[f"{cid}/merged_is_torch"], "merged adapters make the base dense: the torch path must run"
    ref, scale = _expected(case, inputs[cid])
    _assert_close(outputs[f"{cid}/torch"], ref, scale, case["dtype"])  # both paths meet the same bound
    _assert_close(outputs[f"{cid}/y"], ref, scale, case["dtype"])


EXPECTED_ERRORS = {
    "x_dtype": "x: expected float16, bfloat16 or float32",
    "bitmap_width": "bitmap: expected shape [N, ceil(K/8)] = [6, 4] for K = 30",
    "a_cat_shape": "a_cat: expected [R, K] with K = 20",
    "b_cat_shape": "b_cat: expected [N, R] = [6, 3]",
    "a_cat_dtype": "a_cat: expected dtype torch.float16",
    "bias_shape": "bias: expected [N] = [6]",
    "offsets_dtype": "row_offsets: expected int64 [N + 1] = [7]",
    "offsets_decreasing": "row_offsets must be non-decreasing, got row_offsets[2] = 21 > row_offsets[3] = 14",
    "offsets_end": "row_offsets[-1] must equal len(values) = 41, got 42",
    "popcount": "bitmap row 0 keeps 7 entries (popcount) but row_offsets give 8",
    "padding_bits": "bitmap padding bits past in_features = 20 must be 0",
    "fag_b_shape": "b_cat: expected [N, R] with R = 3 (rows of a_cat)",
    "decode_values_rank": "values: expected a 1-D tensor",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_invalid_inputs_raise_value_error(interpreted, name):
    _, _, messages = interpreted
    assert EXPECTED_ERRORS[name] in messages[name]


# Largest shared memory one block may use: Jetson Orin (sm_87) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {87: 163 * 1024, 90: 227 * 1024}


def test_kernels_compile_for_jetson_and_hopper(tmp_path):
    """The GPU lowering (not only the interpreter's semantics): each kernel compiles for sm_87 and sm_90
    without a GPU, the GEMMs use tensor cores, their K loops are software-pipelined (cp.async stages), and
    shared memory fits the smaller of the two GPUs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cap: subprocess.Popen([sys.executable, str(WORKER), "compile", str(cap), str(tmp_path / f"{cap}.json")],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cap in SHARED_LIMIT}
    for cap, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"compiling the Triton kernels for sm_{cap} failed:\n{out}"
        report = json.loads((tmp_path / f"{cap}.json").read_text())
        for name in ("salr_linear", "salr_gemv", "dense_nt"):
            assert report[name]["tensor_core"], f"sm_{cap} {name}: no MMA instruction in the PTX"
            assert report[name]["async_copies"] > 0, f"sm_{cap} {name}: K loop not pipelined: {report[name]}"
        for name, info in report.items():
            assert info["shared_bytes"] <= SHARED_LIMIT[cap], f"sm_{cap} {name}: {info}"


def test_kernels_module_imports_triton_lazily():
    code = ("import sys, salr_edge.kernels as k; before = 'triton' in sys.modules; f = k.salr_linear_forward; "
            "print(before, 'triton' in sys.modules, callable(f))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]
