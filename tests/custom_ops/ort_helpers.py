"""Helpers shared by the ORT CPU tests (test_ort_cpu.py, test_ort_cpu_quantized.py): one-node models,
sessions, the ReferenceEvaluator, keep-masks, kernel-set selection, the tolerance check, and the malformed
weight cases of format v1.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from .reference import OPSET_VERSION, REFERENCE_OPS, SALR_DOMAIN

# Error allowed between a kernel and the float64 reference, per output dtype:
#   |y - ref| <= SCALE_TOL * scale + REL_TOL * |ref|,  scale = |X| |W|^T + (|X| |A|^T) |B|^T + |bias|.
# - The kernels accumulate in fp32 in an order of their own (blocked, vectorised, threads split rows), so
#   the error grows with the sum of |products| rather than with |y| (outputs near zero from cancellation
#   would otherwise need loose relative bounds): fp32 worst case is ~K * 2^-24 * scale; 1e-5 allows
#   K ~ 170 worst-case terms and, for random signs, far more.
# - fp16 outputs are rounded once from fp32: half an ulp is 2^-11 ~ 4.9e-4 relative, so REL_TOL = 1e-3
#   (one ulp); the fp32 accumulation error above comes on top.
# Values are fp16 or fp32 inputs themselves (or int8/int4 codes times fp16 scales, which fp32 holds
# exactly), so no tolerance is spent on them.
TOLERANCES = {
    np.dtype(np.float32): {"SCALE_TOL": 1e-5, "REL_TOL": 0.0},
    np.dtype(np.float16): {"SCALE_TOL": 1e-5, "REL_TOL": 1e-3},
}


def assert_close(y, ref, scale, extra=0.0):
    """|y - ref| <= TOLERANCES bound (+ `extra`, an additional absolute allowance per element)."""
    tol = TOLERANCES[np.dtype(ref.dtype)]
    assert y.dtype == ref.dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.dtype, ref.shape)
    err = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    bound = tol["SCALE_TOL"] * scale + tol["REL_TOL"] * np.abs(ref.astype(np.float64)) + extra + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape) if err.size else None
    assert np.all(err <= bound), f"max err/bound = {(err / bound).max():.3g} at {worst}: y={y[worst]} ref={ref[worst]}"


def make_model(op_type, feeds, const_names, attrs, out_dtype, optional_absent=()):
    """One-node model; names in const_names become initializers, the rest graph inputs.

    Returns (model, the feeds a session run needs)."""
    inputs, inits, names = [], [], []
    for name, arr in feeds.items():
        names.append(name)
        if name in optional_absent:
            names[-1] = ""
            continue
        if name in const_names:
            inits.append(numpy_helper.from_array(arr, name))
        else:
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op_type, names, ["Y"], domain=SALR_DOMAIN, **attrs)
    out = helper.make_tensor_value_info("Y", helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype)), None)
    graph = helper.make_graph([node], "g", inputs, [out], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(SALR_DOMAIN, OPSET_VERSION)]
    )
    model.ir_version = 8  # what ORT 1.21, the oldest runtime the library supports, reads
    run_feeds = {k: v for k, v in feeds.items() if k not in const_names and k not in optional_absent}
    return model, run_feeds


def make_session(lib, model, threads=1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def reference_output(model, feeds):
    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)[0]


def make_mask(rng, n, k, kind, density=0.5):
    """Keep-mask of an [n, k] weight: 'random', 'special' (zero/full/one-entry rows), '2:4' or 'dense'."""
    if kind == "2:4":
        assert k % 4 == 0
        scores = rng.random((n, k // 4, 4))
        keep = np.argsort(scores, axis=2)[:, :, :2]
        mask = np.zeros((n, k // 4, 4), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=2)
        return mask.reshape(n, k)
    if kind == "dense":
        return np.ones((n, k), dtype=bool)
    mask = rng.random((n, k)) < density
    if kind == "special":
        mask[0] = False  # all-zero rows, also at the very end (the last rows take the guarded tail path)
        mask[-1] = False
        mask[1] = True  # all-ones row
        mask[n // 2] = True
        if n > 3:
            mask[-2] = False
            mask[-2, k - 1] = True  # one entry in the last column of a late row
            mask[-3] = False
            mask[-3, 0] = True
    return mask


def use_kernel_set(monkeypatch, kernels):
    """$SALR_KERNELS for the kernels ORT builds next: 'best' (this CPU's fastest), 'scalar', 'avx2', ..."""
    if kernels == "best":
        monkeypatch.delenv("SALR_KERNELS", raising=False)
    else:
        monkeypatch.setenv("SALR_KERNELS", kernels)


def alternate_kernel_set(monkeypatch, index):
    """Alternate between this CPU's best kernel set (even index) and the portable scalar one (odd)."""
    use_kernel_set(monkeypatch, "scalar" if index % 2 else "best")


def malformed_v1_cases():
    """Malformed weights of format v1 on a 12 x 21 layer.

    (name, mutate(feeds) -> (feeds, in_features), expected message fragment of SALRLinear)."""
    k = 21  # ceil(21/8) = 3 bytes, 3 padding bits in the last one

    def offsets_start(f):
        f["row_offsets"] = f["row_offsets"] + 1
        return f, k

    def offsets_decreasing(f):
        o = f["row_offsets"].copy()
        o[2], o[3] = o[3], o[2] - 1 if o[3] > o[2] else o[2] + 1
        o[2] = o[3] + 1
        f["row_offsets"] = o
        return f, k

    def offsets_end(f):
        f["values"] = np.concatenate([f["values"], f["values"][:1]])
        return f, k

    def popcount(f):
        b = f["bitmap"].copy()
        b[4, 0] ^= 0x01
        f["bitmap"] = b
        return f, k

    def padding(f):
        b = f["bitmap"].copy()
        b[3, 2] |= 0x80
        f["bitmap"] = b
        return f, k

    def width(f):
        f["bitmap"] = np.concatenate([f["bitmap"], np.zeros((f["bitmap"].shape[0], 1), np.uint8)], axis=1)
        return f, k

    def wrong_k(f):
        return f, k + 8  # ceil(29/8) = 4 != the bitmap's 3 bytes

    def x_k(f):
        f["X"] = np.concatenate([f["X"], f["X"][:, :1]], axis=1)
        return f, k

    def offsets_len(f):
        f["row_offsets"] = f["row_offsets"][:-1]
        return f, k

    def adapter_k(f):
        f["A_cat"] = f["A_cat"][:, :-1]
        return f, k

    def adapter_r(f):
        f["B_cat"] = f["B_cat"][:, :-1]
        return f, k

    def bias_n(f):
        f["bias"] = f["bias"][:-1]
        return f, k

    return [
        ("offsets_start", offsets_start, "row_offsets[0] = 0"),
        ("offsets_decreasing", offsets_decreasing, "non-decreasing"),
        ("offsets_end", offsets_end, "row_offsets[N] = len(values)"),
        ("popcount", popcount, "popcount"),
        ("padding_bits", padding, "padding bits"),
        ("bitmap_width", width, "ceil(in_features/8)"),
        ("in_features", wrong_k, "ceil(in_features/8)"),
        ("x_last_dim", x_k, "input 'X'"),
        ("offsets_length", offsets_len, "'row_offsets': expected shape [N + 1]"),
        ("adapter_k", adapter_k, "'A_cat'"),
        ("adapter_rank", adapter_r, "'B_cat'"),
        ("bias_length", bias_n, "'bias'"),
    ]
