"""Random malformed inputs for SALRLinear / SALRLinearQ / BitmapDecode: the library must reject or compute,
never crash.

Each case starts from a valid random layer and applies 0-3 random corruptions (bit flips, offsets that are
shifted, shuffled, negative or huge, values that are too short or too long, wrong bitmap widths, wrong
in_features, mismatched adapters, missing attributes; for SALRLinearQ also scales of the wrong count or
rank, int4 values one byte short or long, a non-zero unused high nibble, random codes, and `bits` /
`group_size` attributes that are out of range, huge, or disagree with the values' dtype). A Python
restatement of the format's invariants predicts whether the library must accept the case: accepted cases
are compared with the reference, rejected ones must raise an error naming the op. SALRLinearQ layers are
sometimes 2:4 with K % 64 == 0 and group_size % 32 == 0 at batch 1, so the integer path runs too. Run by
the test suite (a few dozen cases) and by custom_ops/scripts/sanitize_fuzz.sh (thousands, under ASan +
UBSan, where any out-of-bounds read aborts the process).
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import helper, numpy_helper

from .reference import (
    ACTIVATION_BLOCK,
    BITS_ATTR,
    GROUP_SIZE_ATTR,
    IN_FEATURES_ATTR,
    OPSET_VERSION,
    REFERENCE_OPS,
    SALR_DOMAIN,
    SALR_LINEAR_Q,
    activation_quantization_bound,
    dequantized_weight,
    encode_bitmap,
    quantize_values,
)

log = logging.getLogger(__name__)

_COMBOS = [(np.float32, np.float32), (np.float32, np.float16), (np.float16, np.float16)]
OPS = ("BitmapDecode", "SALRLinear", SALR_LINEAR_Q)
_OP_WEIGHTS = (0.2, 0.4, 0.4)


def is_valid(op, attrs, f) -> bool:
    """The invariants of DESIGN.md section 2 (and format v2 for SALRLinearQ) plus the ops' shape rules."""
    k = attrs.get(IN_FEATURES_ATTR)
    bitmap, values, off = f["bitmap"], f["values"], f["row_offsets"]
    if k is None or k < 1 or bitmap.ndim != 2 or values.ndim != 1 or off.ndim != 1:
        return False
    n, width = bitmap.shape
    if width != (k + 7) // 8 or off.shape[0] != n + 1:
        return False
    if off[0] != 0 or np.any(np.diff(off) < 0):
        return False
    nnz = int(off[n])
    if op == SALR_LINEAR_Q:
        bits, gs, scales = attrs.get(BITS_ATTR), attrs.get(GROUP_SIZE_ATTR), f["scales"]
        if bits not in (4, 8) or gs is None or gs < 1:
            return False
        if values.dtype != (np.int8 if bits == 8 else np.uint8):
            return False
        if values.shape[0] != (nnz if bits == 8 else (nnz + 1) // 2):
            return False
        if bits == 4 and nnz % 2 and values[-1] >> 4:
            return False  # the unused high nibble of an odd count must be 0
        if scales.dtype != np.float16 or scales.ndim != 1 or scales.shape[0] != -(-nnz // gs):
            return False
    elif nnz != values.shape[0]:
        return False
    bits_set = np.unpackbits(bitmap, axis=1, bitorder="little")
    if np.any(bits_set[:, k:]) or np.any(bits_set.sum(axis=1) != np.diff(off)):
        return False
    if "X" in f:
        x, a, b = f["X"], f["A_cat"], f["B_cat"]
        if x.shape[-1] != k or a.ndim != 2 or a.shape[1] != k or b.shape != (n, a.shape[0]):
            return False
        if "bias" in f and f["bias"].shape != (n,):
            return False
    return True


def _corrupt(rng, f, attrs):
    """One random corruption (which may also leave the case valid) of feeds `f` / attributes `attrs`."""
    quantized = "scales" in f
    choice = rng.integers(0, 20 if quantized else 13)
    off = f["row_offsets"].copy()
    n = f["bitmap"].shape[0]
    k = attrs.get(IN_FEATURES_ATTR, 1)
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
        attrs[IN_FEATURES_ATTR] = int(rng.choice([k + 1, k - 1, k + 8, 0, -3]))
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
    elif choice == 12 and attrs:
        attrs.pop(rng.choice(sorted(attrs)), None)
    # ---- SALRLinearQ only
    elif choice == 13:
        s = f["scales"]
        longer = np.concatenate([s.reshape(-1), np.ones(1, np.float16)])
        f["scales"] = s[:-1] if s.size and rng.integers(0, 2) else longer
    elif choice == 14:
        f["scales"] = f["scales"].reshape(-1, 1) if rng.integers(0, 2) else f["scales"].reshape(1, -1)
    elif choice == 15 and f["values"].size:
        v = f["values"].copy()  # the last byte's high nibble: unused (must be 0) when an int4 count is odd
        v[-1] = (v[-1] | np.uint8(0xF0)) if v.dtype == np.uint8 else -v[-1]
        f["values"] = v
    elif choice == 16:
        v = f["values"]
        if v.dtype == np.uint8:
            f["values"] = rng.integers(0, 256, size=v.shape, dtype=np.uint8)
        else:
            f["values"] = rng.integers(-127, 128, size=v.shape).astype(np.int8)
    elif choice == 17:
        bits = attrs.get(BITS_ATTR, 8)
        attrs[BITS_ATTR] = int(rng.choice([0, 5, 16, -4, 12 - bits]))  # 12 - bits: 4 <-> 8, dtype mismatch
    elif choice == 18:
        gs = attrs.get(GROUP_SIZE_ATTR, 1)
        attrs[GROUP_SIZE_ATTR] = int(rng.choice([0, -1, -32, gs + 1, max(1, gs - 1), 2**31 - 1, 2**40]))
    elif choice == 19:
        v = f["values"]  # int4 values one byte short or long
        f["values"] = v[:-1] if v.size and rng.integers(0, 2) else np.concatenate([v, v[:1] if v.size else v[:0]])
    return f, attrs


def _model(op, f, attrs, const):
    names = list(f)
    inits = [numpy_helper.from_array(v, n_) for n_, v in f.items() if const and n_ != "X"]
    inputs = [helper.make_tensor_value_info(n_, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n_, v in f.items() if not (const and n_ != "X")]
    out_t = f["X"].dtype if "X" in f else f["values"].dtype
    node = helper.make_node(op, names, ["Y"], domain=SALR_DOMAIN, **attrs)
    graph = helper.make_graph([node], "fuzz", inputs,
                              [helper.make_tensor_value_info("Y", helper.np_dtype_to_tensor_dtype(out_t), None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(SALR_DOMAIN, OPSET_VERSION)])
    model.ir_version = 8
    return model, {n_: v for n_, v in f.items() if not (const and n_ != "X")}


def _layer(rng, op):
    """A valid random layer of `op`: (feeds, attributes)."""
    xdt, vdt = _COMBOS[rng.integers(0, len(_COMBOS))]
    n, k = int(rng.integers(0, 40)), int(rng.integers(1, 70))
    m, r = int(rng.integers(0, 20)), int(rng.integers(0, 4))
    quantized = op == SALR_LINEAR_Q
    bits = int(rng.choice([4, 8]))
    gs = int(rng.choice([1, 3, 7, 16, 32, 64, 1000]))
    if quantized and rng.random() < 0.3:  # an integer-path layer: 2:4, K % 64 == 0, whole groups per row
        k, gs = int(rng.choice([64, 128])), int(rng.choice([32, 64]))
        m = int(rng.choice([1, 1, 1, 2]))
        scores = rng.random((n, k // 4, 4))
        keep = np.zeros((n, k // 4, 4), dtype=bool)
        np.put_along_axis(keep, np.argsort(scores, axis=2)[:, :, :2], True, axis=2)
        keep = keep.reshape(n, k)
    else:
        keep = rng.random((n, k)) < rng.choice([0.0, 0.3, 0.5, 1.0])
    w = rng.standard_normal((n, k)).astype(np.float32)
    bitmap, values, off = encode_bitmap(w, keep, np.float32 if quantized else vdt)
    f = {"bitmap": bitmap, "values": values, "row_offsets": off}
    attrs = {IN_FEATURES_ATTR: k}
    if quantized:
        values, scales = quantize_values(values, bits, gs)
        f = {"bitmap": bitmap, "values": values, "row_offsets": off, "scales": scales}
        attrs.update({BITS_ATTR: bits, GROUP_SIZE_ATTR: gs})
    if op != "BitmapDecode":
        f = {"X": rng.standard_normal((m, k)).astype(xdt), **f,
             "A_cat": rng.standard_normal((r, k)).astype(xdt), "B_cat": rng.standard_normal((n, r)).astype(xdt)}
        if rng.random() < 0.5:
            f["bias"] = rng.standard_normal(n).astype(xdt)
    return f, attrs


def run_fuzz(lib: str, cases: int = 200, seed: int = 0, ops=OPS) -> dict:
    """Run `cases` random cases of the ops in `ops`; returns counts (also per op, under "by_op").

    Raises AssertionError on a wrong accept/reject decision or a wrong accepted result."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(seed)
    stats = {"cases": 0, "accepted": 0, "rejected": 0, "crashes": 0,
             "by_op": {op: {"accepted": 0, "rejected": 0} for op in ops}}
    weights = np.array([_OP_WEIGHTS[OPS.index(op)] for op in ops])
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.intra_op_num_threads = int(rng.integers(1, 3))
    so.log_severity_level = 4  # rejected cases are expected; keep ORT's error log quiet
    # Without the arena every ORT buffer is its own malloc, so AddressSanitizer's redzones sit right after
    # each tensor and an over-read by one element is reported.
    so.enable_cpu_mem_arena = False
    for case in range(cases):
        op = ops[rng.choice(len(ops), p=weights / weights.sum())]
        f, attrs = _layer(rng, op)
        for _ in range(int(rng.integers(0, 4))):
            f, attrs = _corrupt(rng, f, attrs)
        const = bool(rng.integers(0, 2))
        model, feeds = _model(op, f, attrs, const)
        expect_ok = is_valid(op, attrs, f)
        stats["cases"] += 1
        try:
            y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        except Exception as e:  # noqa: BLE001 - any ORT error type is a rejection; a crash never gets here
            assert not expect_ok, f"case {case}: valid input rejected ({op}, {attrs}): {e}"
            assert op in str(e), f"case {case}: error does not name the op: {e}"
            stats["rejected"] += 1
            stats["by_op"][op]["rejected"] += 1
            continue
        assert expect_ok, f"case {case}: malformed input accepted ({op}, {attrs}, shapes " \
                          f"{ {n_: v.shape for n_, v in f.items()} })"
        ref = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, f)[0]
        tol = 1e-2 if ref.dtype == np.float16 else 1e-3
        k = attrs[IN_FEATURES_ATTR]
        extra = 0.0
        if op == SALR_LINEAR_Q and k % ACTIVATION_BLOCK == 0:  # the integer path may have run: allow its rounding
            w = dequantized_weight(f["bitmap"], f["values"], f["row_offsets"], f["scales"], k, attrs[BITS_ATTR],
                                   attrs[GROUP_SIZE_ATTR])
            extra = 1.001 * activation_quantization_bound(f["X"], w)
        np.testing.assert_array_less(np.abs(y.astype(np.float64) - ref.astype(np.float64)),
                                     tol * np.abs(ref.astype(np.float64)) + tol * (1 + k) + extra,
                                     err_msg=f"case {case}: {op} {attrs}")
        stats["accepted"] += 1
        stats["by_op"][op]["accepted"] += 1
    log.info("fuzz: %s", stats)
    return stats
