"""Random malformed inputs for SALRLinear / BitmapDecode: the library must reject or compute, never crash.

Each case starts from a valid random layer and applies 0-3 random corruptions (bit flips, offsets that are
shifted, shuffled, negative or huge, values that are too short or too long, wrong bitmap widths, wrong
in_features, mismatched adapters). A Python restatement of the format's invariants predicts whether the
library must accept the case: accepted cases are compared with the reference, rejected ones must raise an
error naming the op. Run by the test suite (a few dozen cases) and by custom_ops/scripts/sanitize_fuzz.sh
(thousands, under ASan + UBSan, where any out-of-bounds read aborts the process).
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import helper, numpy_helper

from .reference import IN_FEATURES_ATTR, OPSET_VERSION, REFERENCE_OPS, SALR_DOMAIN, encode_bitmap

log = logging.getLogger(__name__)

_COMBOS = [(np.float32, np.float32), (np.float32, np.float16), (np.float16, np.float16)]


def is_valid(k, f) -> bool:
    """The invariants of DESIGN.md section 2 plus SALRLinear's shape rules, restated in NumPy."""
    bitmap, values, off = f["bitmap"], f["values"], f["row_offsets"]
    if k < 1 or bitmap.ndim != 2 or values.ndim != 1 or off.ndim != 1:
        return False
    n, width = bitmap.shape
    if width != (k + 7) // 8 or off.shape[0] != n + 1:
        return False
    if off[0] != 0 or off[n] != values.shape[0] or np.any(np.diff(off) < 0):
        return False
    bits = np.unpackbits(bitmap, axis=1, bitorder="little")
    if np.any(bits[:, k:]) or np.any(bits.sum(axis=1) != np.diff(off)):
        return False
    if "X" in f:
        x, a, b = f["X"], f["A_cat"], f["B_cat"]
        if x.shape[-1] != k or a.ndim != 2 or a.shape[1] != k or b.shape != (n, a.shape[0]):
            return False
        if "bias" in f and f["bias"].shape != (n,):
            return False
    return True


def _corrupt(rng, f, k):
    choice = rng.integers(0, 12)
    off = f["row_offsets"].copy()
    n = f["bitmap"].shape[0]
    if choice == 0 and f["bitmap"].size:
        b = f["bitmap"].copy()
        b.flat[rng.integers(0, b.size)] ^= np.uint8(1 << rng.integers(0, 8))
        f["bitmap"] = b
    elif choice == 1 and off.size:
        off[rng.integers(0, off.size)] += rng.choice([-1, 1, 7, -1000, 2**40, -(2**62)])
        f["row_offsets"] = off
    elif choice == 2:
        f["row_offsets"] = rng.permutation(off)
    elif choice == 3:
        f["values"] = f["values"][: max(0, f["values"].shape[0] - int(rng.integers(1, 9)))]
    elif choice == 4:
        f["values"] = np.concatenate([f["values"], f["values"][:3]])
    elif choice == 5:
        extra = np.zeros((n, int(rng.integers(1, 3))), np.uint8)
        f["bitmap"] = np.concatenate([f["bitmap"], extra], axis=1) if rng.integers(0, 2) else f["bitmap"][:, :-1]
    elif choice == 6:
        k = int(rng.choice([k + 1, k - 1, k + 8, 0, -3]))
    elif choice == 7:
        f["row_offsets"] = rng.integers(-5, 50, size=off.shape[0] + int(rng.integers(-1, 2))).astype(np.int64)
    elif choice == 8:
        f["bitmap"] = rng.integers(0, 256, size=f["bitmap"].shape, dtype=np.uint8)
    elif choice == 9 and "X" in f:
        f["A_cat"] = f["A_cat"][:, : max(0, f["A_cat"].shape[1] - 1)]
    elif choice == 10 and "X" in f:
        f["B_cat"] = np.concatenate([f["B_cat"], f["B_cat"][:, :1]], axis=1)
    elif choice == 11 and "X" in f:
        f["X"] = f["X"][..., : max(0, f["X"].shape[-1] - 1)]
    return f, k


def _model(op, f, k, const):
    names = list(f)
    inits = [numpy_helper.from_array(v, n_) for n_, v in f.items() if const and n_ != "X"]
    inputs = [helper.make_tensor_value_info(n_, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n_, v in f.items() if not (const and n_ != "X")]
    out_t = f["X"].dtype if "X" in f else f["values"].dtype
    node = helper.make_node(op, names, ["Y"], domain=SALR_DOMAIN, **{IN_FEATURES_ATTR: k})
    graph = helper.make_graph([node], "fuzz", inputs,
                              [helper.make_tensor_value_info("Y", helper.np_dtype_to_tensor_dtype(out_t), None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(SALR_DOMAIN, OPSET_VERSION)])
    model.ir_version = 8
    return model, {n_: v for n_, v in f.items() if not (const and n_ != "X")}


def run_fuzz(lib: str, cases: int = 200, seed: int = 0) -> dict:
    """Run `cases` random cases; returns counts. Raises AssertionError on a wrong accept/reject decision."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(seed)
    stats = {"cases": 0, "accepted": 0, "rejected": 0, "crashes": 0}
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.intra_op_num_threads = int(rng.integers(1, 3))
    so.log_severity_level = 4  # rejected cases are expected; keep ORT's error log quiet
    # Without the arena every ORT buffer is its own malloc, so AddressSanitizer's redzones sit right after
    # each tensor and an over-read by one element is reported.
    so.enable_cpu_mem_arena = False
    for case in range(cases):
        xdt, vdt = _COMBOS[rng.integers(0, len(_COMBOS))]
        n, k = int(rng.integers(0, 40)), int(rng.integers(1, 70))
        m, r = int(rng.integers(0, 20)), int(rng.integers(0, 4))
        op = "BitmapDecode" if rng.random() < 0.2 else "SALRLinear"
        w = rng.standard_normal((n, k)).astype(np.float32)
        density = rng.choice([0.0, 0.3, 0.5, 1.0])
        bitmap, values, off = encode_bitmap(w, rng.random((n, k)) < density, vdt)
        f = {"bitmap": bitmap, "values": values, "row_offsets": off}
        if op == "SALRLinear":
            f = {"X": rng.standard_normal((m, k)).astype(xdt), **f,
                 "A_cat": rng.standard_normal((r, k)).astype(xdt), "B_cat": rng.standard_normal((n, r)).astype(xdt)}
            if rng.random() < 0.5:
                f["bias"] = rng.standard_normal(n).astype(xdt)
        for _ in range(int(rng.integers(0, 4))):
            f, k = _corrupt(rng, f, k)
        const = bool(rng.integers(0, 2))
        model, feeds = _model(op, f, k, const)
        expect_ok = is_valid(k, f)
        stats["cases"] += 1
        try:
            y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        except Exception as e:  # noqa: BLE001 - any ORT error type is a rejection; a crash never gets here
            assert not expect_ok, f"case {case}: valid input rejected: {e}"
            assert op in str(e), f"case {case}: error does not name the op: {e}"
            stats["rejected"] += 1
            continue
        assert expect_ok, f"case {case}: malformed input accepted ({op}, k={k}, shapes " \
                          f"{ {n_: v.shape for n_, v in f.items()} })"
        ref = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, f)[0]
        tol = 1e-2 if ref.dtype == np.float16 else 1e-3
        np.testing.assert_allclose(y.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol * (1 + k))
        stats["accepted"] += 1
    log.info("fuzz: %s", stats)
    return stats
