"""com.salr CPU kernels in ONNX Runtime vs the NumPy references (ReferenceEvaluator with new_ops).

One-node models, weights either constant initializers (validated once when ORT constructs the kernel) or
graph inputs (validated on every run); odd shapes; every dtype combination; 1 and 2 intra-op threads; the
best kernel set of this CPU and the portable scalar set ($SALR_KERNELS, read when a kernel is built).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from .ort_helpers import (
    alternate_kernel_set,
    assert_close,
    make_mask,
    make_model,
    make_session,
    malformed_v1_cases,
    reference_output,
    use_kernel_set,
)
from .reference import (
    BITMAP_DECODE,
    FUSED_ADAPTER_GEMM,
    IN_FEATURES_ATTR,
    SALR_LINEAR,
    decode_bitmap,
    encode_bitmap,
)

ort = pytest.importorskip("onnxruntime")

DTYPE_COMBOS = [  # (activation dtype, values dtype)
    (np.float32, np.float32),
    (np.float32, np.float16),
    (np.float16, np.float16),
]


# (N, K, mask kind): K = 545 and N = 830 are not multiples of anything; K < 8 and K = 1 leave most of a
# bitmap byte as padding; 2:4 with an even and an odd number of bitmap bytes per row.
SHAPES = [
    (830, 545, "random"),
    (7, 5, "random"),
    (3, 1, "random"),
    (67, 77, "special"),
    (40, 112, "2:4"),
    (24, 104, "2:4"),
]
ROWS = [1, 7, 64, 128]


def _salr_case(rng, n, k, kind, m, xdt, vdt, rank, bias, x_shape=None, density=0.5):
    w = rng.standard_normal((n, k)).astype(np.float32)
    bitmap, values, offsets = encode_bitmap(w, make_mask(rng, n, k, kind, density), vdt)
    x = rng.standard_normal(x_shape or (m, k)).astype(xdt)
    a = (rng.standard_normal((rank, k)) / np.sqrt(k)).astype(xdt)
    b = rng.standard_normal((n, rank)).astype(xdt)  # B != 0: the adapter path must contribute
    feeds = {"X": x, "bitmap": bitmap, "values": values, "row_offsets": offsets, "A_cat": a, "B_cat": b}
    if bias:
        feeds["bias"] = rng.standard_normal(n).astype(xdt)
    wd = decode_bitmap(bitmap, values, offsets, k).astype(np.float64)
    ax = np.abs(x.astype(np.float64))
    scale = ax @ np.abs(wd).T + (ax @ np.abs(a.astype(np.float64)).T) @ np.abs(b.astype(np.float64)).T
    if bias:
        scale = scale + np.abs(feeds["bias"].astype(np.float64))
    return feeds, scale


@pytest.mark.parametrize("const", [True, False], ids=["const", "graph_input"])
@pytest.mark.parametrize("xdt,vdt", DTYPE_COMBOS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n,k,kind", SHAPES, ids=[f"{n}x{k}-{kind}" for n, k, kind in SHAPES])
def test_salr_linear_matches_reference(salr_lib, monkeypatch, n, k, kind, xdt, vdt, const):
    seed = hash((n, k, kind, np.dtype(xdt).name, np.dtype(vdt).name, const)) % 2**32
    rng = np.random.default_rng(seed)
    for i, m in enumerate(ROWS):
        # Rank 0 / > 0, bias / none, 1 / 2 threads and the kernel set rotate over the M values so that
        # every M sees each of them across the parametrisation without a full cartesian product.
        rank = (0, 5)[(i + const) % 2]
        bias = (i // 2 + const) % 2 == 0
        threads = 1 + (i + (kind == "2:4")) % 2
        alternate_kernel_set(monkeypatch, i + (vdt is np.float16))
        feeds, scale = _salr_case(rng, n, k, kind, m, xdt, vdt, rank, bias)
        consts = set(feeds) - {"X"} if const else set()
        model, run_feeds = make_model(SALR_LINEAR, feeds, consts, {IN_FEATURES_ATTR: k}, xdt)
        y = make_session(salr_lib, model, threads).run(None, run_feeds)[0]
        assert_close(y, reference_output(model, feeds), scale)


@pytest.mark.parametrize("kernels", ["best", "scalar"])
@pytest.mark.parametrize("m", [1, 2, 15, 16, 17, 200])
def test_salr_linear_paths_agree(salr_lib, monkeypatch, kernels, m):
    """Every M regime (m = 1 gemv, small m, the m >= 16 prefill path, a partial 64-row block) on one layer."""
    rng = np.random.default_rng(m)
    use_kernel_set(monkeypatch, kernels)
    feeds, scale = _salr_case(rng, 301, 1030, "special", m, np.float32, np.float16, 7, True)
    model, run_feeds = make_model(SALR_LINEAR, feeds, set(feeds) - {"X"}, {IN_FEATURES_ATTR: 1030}, np.float32)
    y = make_session(salr_lib, model, 2).run(None, run_feeds)[0]
    assert_close(y, reference_output(model, feeds), scale)


@pytest.mark.parametrize("kernels", ["best", "scalar"])
@pytest.mark.parametrize("density", [0.2, 0.58, 0.62, 0.9])
def test_salr_linear_prefill_on_both_sides_of_the_dense_tile_density(salr_lib, monkeypatch, kernels, density):
    """The prefill runs kept-entry lists below 60% density and decoded dense tiles from it on: both agree with
    the reference, with a partial last row group (77 rows) and a partial last block of activation rows (m = 70)."""
    rng = np.random.default_rng(int(density * 100))
    use_kernel_set(monkeypatch, kernels)
    feeds, scale = _salr_case(rng, 77, 203, "special", 70, np.float32, np.float16, 5, True, density=density)
    model, run_feeds = make_model(SALR_LINEAR, feeds, set(feeds) - {"X"}, {IN_FEATURES_ATTR: 203}, np.float32)
    y = make_session(salr_lib, model, 2).run(None, run_feeds)[0]
    assert_close(y, reference_output(model, feeds), scale)


@pytest.mark.parametrize("kernels", ["best", "scalar"])
@pytest.mark.parametrize("n,k,kind", [(830, 545, "random"), (93, 576, "2:4")], ids=["830x545", "93x576-2:4"])
def test_salr_linear_batch1_fp16_exact_adapters(salr_lib, monkeypatch, kernels, n, k, kind):
    """fp32 adapters whose entries are all fp16 values (exported graphs cast them from fp16) take the kernel's
    compact fp16 batch-1 form; B block-diagonal as in fused layers, its blocks crossing 8-output groups."""
    use_kernel_set(monkeypatch, kernels)
    rng = np.random.default_rng(n)
    feeds, scale = _salr_case(rng, n, k, kind, 1, np.float32, np.float16, 9, True)
    feeds["A_cat"] = feeds["A_cat"].astype(np.float16).astype(np.float32)
    b = feeds["B_cat"].astype(np.float16).astype(np.float32)
    block_of_row = np.arange(n) * 3 // n
    block_of_rank = np.arange(9) // 3
    feeds["B_cat"] = np.where(block_of_row[:, None] == block_of_rank[None, :], b, 0).astype(np.float32)
    model, run_feeds = make_model(SALR_LINEAR, feeds, set(feeds) - {"X"}, {IN_FEATURES_ATTR: k}, np.float32)
    ref = reference_output(model, feeds)
    for threads in (1, 2):
        assert_close(make_session(salr_lib, model, threads).run(None, run_feeds)[0], ref, scale)


@pytest.mark.parametrize("xdt,vdt", DTYPE_COMBOS, ids=lambda d: np.dtype(d).name)
def test_salr_linear_batched_input_and_optional_bias(salr_lib, xdt, vdt):
    rng = np.random.default_rng(1)
    n, k = 29, 43
    feeds, scale = _salr_case(rng, n, k, "random", None, xdt, vdt, 3, True, x_shape=(2, 3, k))
    for absent in [(), ("bias",)]:
        model, run_feeds = make_model(SALR_LINEAR, feeds, {"bitmap", "values", "row_offsets"},
                                      {IN_FEATURES_ATTR: k}, xdt, optional_absent=absent)
        y = make_session(salr_lib, model).run(None, run_feeds)[0]
        ref = reference_output(model, {k_: v for k_, v in feeds.items() if k_ not in absent})
        assert y.shape == (2, 3, n)
        s = scale.reshape(2, 3, n) - (np.abs(feeds["bias"].astype(np.float64)) if absent else 0)
        assert_close(y, ref, s)


def test_salr_linear_empty_activations(salr_lib):
    rng = np.random.default_rng(2)
    feeds, _ = _salr_case(rng, 9, 20, "random", None, np.float32, np.float16, 2, True, x_shape=(0, 20))
    model, run_feeds = make_model(SALR_LINEAR, feeds, set(feeds) - {"X"}, {IN_FEATURES_ATTR: 20}, np.float32)
    y = make_session(salr_lib, model).run(None, run_feeds)[0]
    assert y.shape == (0, 9)


def test_salr_linear_large_gemv_threads_agree(salr_lib, monkeypatch):
    """A 4096-wide layer through the tuned M = 1 path (prefetch, row pairs, dynamic chunks) on 1 and 2 threads."""
    use_kernel_set(monkeypatch, "best")
    rng = np.random.default_rng(3)
    for kind in ["random", "2:4"]:
        feeds, scale = _salr_case(rng, 515, 4096, kind, 1, np.float32, np.float16, 4, False)
        model, run_feeds = make_model(SALR_LINEAR, feeds, set(feeds) - {"X"}, {IN_FEATURES_ATTR: 4096}, np.float32)
        ref = reference_output(model, feeds)
        for threads in (1, 2):
            assert_close(make_session(salr_lib, model, threads).run(None, run_feeds)[0], ref, scale)


@pytest.mark.parametrize("const", [True, False], ids=["const", "graph_input"])
@pytest.mark.parametrize("vdt", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n,k", [(830, 545), (5, 1), (16, 8), (0, 9)])
def test_bitmap_decode_is_exact(salr_lib, n, k, vdt, const):
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bitmap, values, offsets = encode_bitmap(w, make_mask(rng, n, k, "random") if n else None, vdt)
    feeds = {"bitmap": bitmap, "values": values, "row_offsets": offsets}
    model, run_feeds = make_model(BITMAP_DECODE, feeds, set(feeds) if const else set(), {IN_FEATURES_ATTR: k}, vdt)
    y = make_session(salr_lib, model, 2).run(None, run_feeds)[0]
    ref = reference_output(model, feeds)
    assert y.dtype == np.dtype(vdt) and y.shape == (n, k)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("const", [True, False], ids=["const", "graph_input"])
@pytest.mark.parametrize("xdt", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("m,n,k,r", [(1, 830, 545, 7), (7, 33, 5, 1), (64, 20, 1, 3), (128, 9, 70, 16), (3, 11, 13, 0)])
def test_fused_adapter_gemm(salr_lib, m, n, k, r, xdt, const):
    rng = np.random.default_rng(m + n + k + r)
    x = rng.standard_normal((m, k)).astype(xdt)
    a = rng.standard_normal((r, k)).astype(xdt)
    b = rng.standard_normal((n, r)).astype(xdt)
    feeds = {"X": x, "A_cat": a, "B_cat": b}
    model, run_feeds = make_model(FUSED_ADAPTER_GEMM, feeds, {"A_cat", "B_cat"} if const else set(), {}, xdt)
    y = make_session(salr_lib, model, 1 + (m % 2)).run(None, run_feeds)[0]
    f = [v.astype(np.float64) for v in (x, a, b)]
    assert_close(y, reference_output(model, feeds), (np.abs(f[0]) @ np.abs(f[1]).T) @ np.abs(f[2]).T)


def test_encoder_golden_bytes():
    """Pins the bit order of the test encoder (and so what the kernels are checked against)."""
    w = np.zeros((2, 10), dtype=np.float32)
    w[0, [0, 3, 8]] = [1.0, 2.0, 3.0]
    w[1, [7, 9]] = [4.0, 5.0]
    bitmap, values, offsets = encode_bitmap(w, values_dtype=np.float32)
    assert bitmap.tolist() == [[0b00001001, 0b00000001], [0b10000000, 0b00000010]]
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert offsets.tolist() == [0, 3, 5]


# ------------------------------------------------------------------------------------------ malformed input


@pytest.mark.parametrize("const", [True, False], ids=["const", "graph_input"])
@pytest.mark.parametrize("name,mutate,fragment", malformed_v1_cases(), ids=[c[0] for c in malformed_v1_cases()])
def test_malformed_inputs_raise(salr_lib, name, mutate, fragment, const):
    rng = np.random.default_rng(7)
    feeds, _ = _salr_case(rng, 12, 21, "random", 3, np.float32, np.float16, 2, True)
    feeds, k = mutate(dict(feeds))
    model, run_feeds = make_model(SALR_LINEAR, feeds, set(feeds) - {"X"} if const else set(),
                                  {IN_FEATURES_ATTR: k}, np.float32)
    with pytest.raises(Exception) as info:  # session creation (constants) or run (graph inputs)
        make_session(salr_lib, model).run(None, run_feeds)
    msg = str(info.value)
    assert "SALRLinear" in msg and fragment in msg, msg


@pytest.mark.parametrize("name,mutate,fragment", malformed_v1_cases()[:7], ids=[c[0] for c in malformed_v1_cases()[:7]])
def test_bitmap_decode_malformed_inputs_raise(salr_lib, name, mutate, fragment):
    rng = np.random.default_rng(8)
    feeds, _ = _salr_case(rng, 12, 21, "random", 3, np.float32, np.float16, 2, True)
    feeds, k = mutate(dict(feeds))
    sub = {n: feeds[n] for n in ("bitmap", "values", "row_offsets")}
    model, run_feeds = make_model(BITMAP_DECODE, sub, set(), {IN_FEATURES_ATTR: k}, np.float16)
    with pytest.raises(Exception) as info:
        make_session(salr_lib, model).run(None, run_feeds)
    assert "BitmapDecode" in str(info.value) and fragment in str(info.value)


def test_missing_in_features_attribute(salr_lib):
    rng = np.random.default_rng(9)
    feeds, _ = _salr_case(rng, 4, 9, "random", 1, np.float32, np.float16, 0, False)
    model, run_feeds = make_model(SALR_LINEAR, feeds, set(), {}, np.float32)
    with pytest.raises(Exception, match="in_features"):
        make_session(salr_lib, model).run(None, run_feeds)


def test_random_malformed_inputs_never_crash(salr_lib):
    """A small in-suite fuzz pass (custom_ops/scripts/sanitize_fuzz.sh runs a larger one under ASan+UBSan)."""
    from .fuzz import run_fuzz

    stats = run_fuzz(salr_lib, cases=60, seed=11)
    assert stats["crashes"] == 0 and stats["cases"] == 60
    assert stats["rejected"] > 0 and stats["accepted"] > 0


def test_all_type_combinations_register(salr_lib):
    """Every (X, values) combination binds to a kernel; an unsupported one (fp16 X, fp32 values) is refused."""
    rng = np.random.default_rng(10)
    for xdt, vdt in itertools.chain(DTYPE_COMBOS, [(np.float16, np.float32)]):
        feeds, _ = _salr_case(rng, 4, 9, "random", 1, xdt, vdt, 1, False)
        model, run_feeds = make_model(SALR_LINEAR, feeds, set(), {IN_FEATURES_ATTR: 9}, xdt)
        if (xdt, vdt) in DTYPE_COMBOS:
            make_session(salr_lib, model).run(None, run_feeds)
        else:
            with pytest.raises(Exception):
                make_session(salr_lib, model).run(None, run_feeds)
