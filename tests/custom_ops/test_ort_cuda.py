"""com.salr CUDA kernels in ONNX Runtime's CUDA execution provider vs the NumPy references.

Needs a CUDA GPU, onnxruntime with the CUDA EP (onnxruntime-gpu, or the JetPack wheel) and libsalr_ops.so
built with SALR_CUDA=ON; skips otherwise. CPU fallback is disabled in every session, so a pass means the
CUDA kernels ran. Covers the decode-phase GEMV (M <= 8) and the tiled GEMM (M > 8), odd shapes, all-zero
and fully dense rows, R = 0 and R > 0 with B != 0, constant weights (validated on the host at session
creation) and graph-input weights (validated on the device every run), and malformed weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from .reference import (
    BITMAP_DECODE,
    FUSED_ADAPTER_GEMM,
    IN_FEATURES_ATTR,
    OPSET_VERSION,
    REFERENCE_OPS,
    SALR_DOMAIN,
    SALR_LINEAR,
    encode_bitmap,
)

pytestmark = pytest.mark.gpu
ort = pytest.importorskip("onnxruntime")

# Error allowed against the float64 reference: |y - ref| <= SCALE_TOL * scale + REL_TOL * |ref| with
# scale = |X| |W|^T + (|X| |A|^T) |B|^T + |bias| (see test_ort_cpu.py for the reasoning). The CUDA kernels
# keep H = X·A_catᵀ in the activation type between the two adapter GEMMs (tensor cores read fp16), which
# costs one fp16 rounding of a term bounded by scale: SCALE_TOL = 2^-11 on top of fp32 accumulation.
TOLERANCES = {
    np.dtype(np.float32): {"SCALE_TOL": 1e-5, "REL_TOL": 0.0},
    np.dtype(np.float16): {"SCALE_TOL": 2.0**-11 + 1e-5, "REL_TOL": 2.0**-10},
}
DTYPE_COMBOS = [(np.float32, np.float32), (np.float32, np.float16), (np.float16, np.float16)]


@pytest.fixture(scope="module")
def cuda_lib(salr_lib):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    with open(salr_lib, "rb") as f:
        if b"CUDAExecutionProvider" not in f.read():
            pytest.skip(f"{salr_lib} has no CUDA kernels: rebuild with SALR_CUDA=ON")
    return salr_lib


def _mask(rng, n, k, special):
    mask = rng.random((n, k)) < 0.5
    if special:
        mask[: min(n, 40), 64:128] = False  # all-zero tiles
        mask[0] = False
        mask[1] = True
        mask[-1] = True
    return mask


def _model(op_type, feeds, const_names, attrs, out_dtype):
    inputs, inits = [], []
    for name, arr in feeds.items():
        if name in const_names:
            inits.append(numpy_helper.from_array(arr, name))
        else:
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
    node = helper.make_node(op_type, list(feeds), ["Y"], domain=SALR_DOMAIN, **attrs)
    out = helper.make_tensor_value_info("Y", helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype)), None)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(SALR_DOMAIN, OPSET_VERSION)]
    model = helper.make_model(helper.make_graph([node], "g", inputs, [out], inits), opset_imports=opsets)
    model.ir_version = 8
    return model, {k: v for k, v in feeds.items() if k not in const_names}


def _session(lib, model):
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])


def _assert_close(y, ref, scale):
    tol = TOLERANCES[np.dtype(ref.dtype)]
    assert y.dtype == ref.dtype and y.shape == ref.shape
    err = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    bound = tol["SCALE_TOL"] * scale + tol["REL_TOL"] * np.abs(ref.astype(np.float64)) + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape) if err.size else None
    assert np.all(err <= bound), f"max err/bound = {(err / bound).max():.3g} at {worst}: y={y[worst]} ref={ref[worst]}"


@pytest.mark.parametrize("xdt,vdt", DTYPE_COMBOS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n,k,special", [(830, 545, False), (67, 203, True), (64, 128, False)])
@pytest.mark.parametrize("m", [1, 7, 64, 130])
@pytest.mark.parametrize("rank,bias", [(0, False), (5, True)])
@pytest.mark.parametrize("constant", [True, False], ids=["const", "input"])
def test_salr_linear(cuda_lib, xdt, vdt, n, k, special, m, rank, bias, constant):
    rng = np.random.default_rng(n * 1000 + k + m)
    dense = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    bitmap, values, offsets = encode_bitmap(dense, _mask(rng, n, k, special), vdt)
    x = rng.standard_normal((m, k)).astype(xdt)
    a = (rng.standard_normal((rank, k)) / np.sqrt(k)).astype(xdt)
    b = rng.standard_normal((n, rank)).astype(xdt)  # B != 0: the adapter path must contribute
    feeds = {"X": x, "bitmap": bitmap, "values": values, "row_offsets": offsets, "A_cat": a, "B_cat": b}
    if bias:
        feeds["bias"] = rng.standard_normal(n).astype(xdt)
    consts = {"bitmap", "values", "row_offsets", "A_cat", "B_cat", "bias"} if constant else set()
    model, run_feeds = _model(SALR_LINEAR, feeds, consts, {IN_FEATURES_ATTR: k}, xdt)
    y = _session(cuda_lib, model).run(None, run_feeds)[0]
    ref = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, run_feeds)[0]
    w = np.zeros((n, k))
    w[np.unpackbits(bitmap, axis=1, bitorder="little")[:, :k].astype(bool)] = values.astype(np.float64)
    x64 = np.abs(x.astype(np.float64))
    scale = x64 @ np.abs(w).T + (x64 @ np.abs(a.astype(np.float64)).T) @ np.abs(b.astype(np.float64)).T
    if bias:
        scale = scale + np.abs(feeds["bias"].astype(np.float64))
    _assert_close(y, ref, scale)


@pytest.mark.parametrize("vdt", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("constant", [True, False], ids=["const", "input"])
def test_bitmap_decode(cuda_lib, vdt, constant):
    rng = np.random.default_rng(1)
    n, k = 33, 545
    dense = rng.standard_normal((n, k)).astype(np.float32)
    bitmap, values, offsets = encode_bitmap(dense, _mask(rng, n, k, True), vdt)
    feeds = {"bitmap": bitmap, "values": values, "row_offsets": offsets}
    model, run_feeds = _model(BITMAP_DECODE, feeds, set(feeds) if constant else set(), {IN_FEATURES_ATTR: k}, vdt)
    y = _session(cuda_lib, model).run(None, run_feeds)[0]
    np.testing.assert_array_equal(y, ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, run_feeds)[0])


@pytest.mark.parametrize("xdt", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("m,rank", [(1, 12), (7, 0), (100, 12)])
def test_fused_adapter_gemm(cuda_lib, xdt, m, rank):
    rng = np.random.default_rng(2)
    k, n = 70, 45
    feeds = {"X": rng.standard_normal((m, k)).astype(xdt),
             "A_cat": (rng.standard_normal((rank, k)) / np.sqrt(k)).astype(xdt),
             "B_cat": rng.standard_normal((n, rank)).astype(xdt)}
    model, run_feeds = _model(FUSED_ADAPTER_GEMM, feeds, {"A_cat", "B_cat"}, {}, xdt)
    y = _session(cuda_lib, model).run(None, run_feeds)[0]
    ref = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, run_feeds)[0]
    x64 = np.abs(feeds["X"].astype(np.float64))
    scale = (x64 @ np.abs(feeds["A_cat"].astype(np.float64)).T) @ np.abs(feeds["B_cat"].astype(np.float64)).T
    _assert_close(y, ref, scale)


@pytest.mark.parametrize("constant", [True, False], ids=["const", "input"])
@pytest.mark.parametrize("m", [1, 64])
def test_malformed_weight_is_an_error_status(cuda_lib, constant, m):
    rng = np.random.default_rng(3)
    n, k = 20, 77
    bitmap, values, offsets = encode_bitmap(rng.standard_normal((n, k)).astype(np.float32),
                                            _mask(rng, n, k, False), np.float16)
    bitmap = bitmap.copy()
    bitmap[5, 0] ^= 0x01  # row 5's popcount no longer matches its offsets
    feeds = {"X": rng.standard_normal((m, k)).astype(np.float16), "bitmap": bitmap, "values": values,
             "row_offsets": offsets, "A_cat": np.zeros((0, k), np.float16), "B_cat": np.zeros((n, 0), np.float16)}
    consts = {"bitmap", "values", "row_offsets"} if constant else set()
    model, run_feeds = _model(SALR_LINEAR, feeds, consts, {IN_FEATURES_ATTR: k}, np.float16)
    with pytest.raises(Exception, match=r"row 5 keeps \d+ entries \(popcount\)"):
        _session(cuda_lib, model).run(None, run_feeds)
