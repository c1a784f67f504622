"""com.salr::SALRLinearQ (bitmap format v2: int8 / packed int4 values, fp16 group scales) in ONNX Runtime vs the
NumPy references, and the references themselves.

The CPU kernel has two paths (custom_ops/README.md, "Bitmap format v2"):
- the integer path, at batch 1 (M = 1) on 2:4 layers with K % 64 == 0, group_size % 32 == 0 and
  (K / 2) % group_size == 0: activations quantized to int8 per block of 32 columns, integer dot products.
  It is checked tightly (fp32 accumulation only) against `salr_linear_q_int_path`, which restates that
  arithmetic, and loosely against the exact reference: within the bound activation rounding allows
  (`activation_quantization_bound`: half an activation step per kept entry, sum_b s_x/2 sum |W|).
- the float path (everything else) dequantizes the values to fp32 and must be as accurate as SALRLinear:
  the tolerance table of ort_helpers, against the exact float64 reference.
A tight comparison is also what tells the paths apart: an integer-path result misses the float tolerance and
a float-path result misses the integer-path one, so each test also checks which path a layer takes.
"""

from __future__ import annotations

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
    ACTIVATION_BLOCK,
    BITS_ATTR,
    GROUP_SIZE_ATTR,
    IN_FEATURES_ATTR,
    SALR_LINEAR_Q,
    activation_quantization_bound,
    dequantize_values,
    dequantized_weight,
    encode_bitmap,
    pack_codes,
    quantize_activations,
    quantize_values,
    salr_linear_q_int_path,
    unpack_codes,
)

ort = pytest.importorskip("onnxruntime")

XDTYPES = [np.float32, np.float16]
BITS = [4, 8]


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


def _q_case(rng, n, k, kind, x_shape, xdt, bits, group_size, rank, bias, nnz_parity=None, random_codes=False):
    """A random SALRLinearQ layer and activations.

    nnz_parity: 0 / 1 forces an even / odd number of kept entries (flipping one entry of an ordinary row).
    random_codes: uniform codes over the whole format range (int4 -8..7, int8 -127..127) instead of the
    quantizer's (which never writes -8).

    Returns:
        (feeds, attributes, dense dequantized W float64 [N, K], scale of the tolerance table [..., N]).
    """
    mask = make_mask(rng, n, k, kind)
    if nnz_parity is not None and mask.sum() % 2 != nnz_parity:
        row = int(rng.integers(2, n - 3)) if n > 5 else 0  # not one of make_mask's special rows
        mask[row, int(rng.integers(0, k))] ^= True
    w = rng.standard_normal((n, k)).astype(np.float32)
    bitmap, vals, offsets = encode_bitmap(w, mask, np.float32)
    stored, scales = quantize_values(vals, bits, group_size)
    if random_codes:
        nnz = int(offsets[-1])
        stored = pack_codes(rng.integers(-8, 8, nnz) if bits == 4 else rng.integers(-127, 128, nnz), bits)
    x = rng.standard_normal(x_shape).astype(xdt)
    a = (rng.standard_normal((rank, k)) / np.sqrt(k)).astype(xdt)
    b = rng.standard_normal((n, rank)).astype(xdt)  # B != 0: the adapter path must contribute
    feeds = {"X": x, "bitmap": bitmap, "values": stored, "row_offsets": offsets, "scales": scales,
             "A_cat": a, "B_cat": b}
    if bias:
        feeds["bias"] = rng.standard_normal(n).astype(xdt)
    attrs = {IN_FEATURES_ATTR: k, BITS_ATTR: bits, GROUP_SIZE_ATTR: group_size}
    wd = dequantized_weight(bitmap, stored, offsets, scales, k, bits, group_size)
    return feeds, attrs, wd, _scale(feeds, wd)


def _scale(feeds, wd):
    """|X| |W|^T + (|X| |A|^T) |B|^T + |bias|: the magnitude the accumulation error grows with."""
    ax = np.abs(feeds["X"].astype(np.float64))
    scale = ax @ np.abs(wd).T + (ax @ np.abs(feeds["A_cat"].astype(np.float64)).T) @ np.abs(
        feeds["B_cat"].astype(np.float64)).T
    if "bias" in feeds:
        scale = scale + np.abs(feeds["bias"].astype(np.float64))
    return scale


def _run(lib, feeds, attrs, const, threads=1):
    consts = set(feeds) - {"X"} if const else set()
    model, run_feeds = make_model(SALR_LINEAR_Q, feeds, consts, attrs, feeds["X"].dtype)
    return make_session(lib, model, threads).run(None, run_feeds)[0], model


def _int_reference(feeds, attrs):
    return salr_linear_q_int_path(*feeds.values(), in_features=attrs[IN_FEATURES_ATTR], bits=attrs[BITS_ATTR],
                                  group_size=attrs[GROUP_SIZE_ATTR])


def _assert_int_path(y, feeds, attrs, model, wd, scale):
    """Tight against the integer-path restatement, within the activation-rounding bound of the exact answer."""
    bound = activation_quantization_bound(feeds["X"], wd)
    assert_close(y, _int_reference(feeds, attrs), scale + bound)
    assert_close(y, reference_output(model, feeds), scale, extra=1.001 * bound)


# ------------------------------------------------------------------------------------------ float path

# (N, K, mask kind, group_size, nnz parity or None): every one takes the float path at every M.
FLOAT_CASES = [
    (83, 545, "random", 32, 1),  # K a multiple of nothing; odd nnz (int4: a half-used last byte)
    (7, 5, "random", 7, 1),  # K < 8; groups of 7 span rows
    (3, 1, "random", 1, 0),  # K = 1; one scale per value
    (67, 77, "special", 7, 0),  # all-zero, all-ones and one-entry rows; groups span rows
    (31, 64, "dense", 64, None),  # fully dense rows, K % 64 == 0: dense is not 2:4
    (29, 64, "random", 32, 1),  # K % 64 == 0 and group_size % 32 == 0 but unstructured
    (40, 112, "2:4", 8, None),  # 2:4, K % 64 != 0
    (24, 96, "2:4", 16, None),  # 2:4, K % 64 != 0, group_size % 32 != 0
    (64, 128, "2:4", 48, None),  # 2:4, K % 64 == 0, group_size % 32 != 0
    (64, 192, "2:4", 64, None),  # 2:4, K % 64 == 0, group_size % 32 == 0, but (K/2) % group_size != 0
    (9, 20, "random", 1000, 1),  # one group longer than nnz
]
FLOAT_ROWS = [1, 3, 17, 40]


@pytest.mark.parametrize("const", [True, False], ids=["const", "graph_input"])
@pytest.mark.parametrize("xdt", XDTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("n,k,kind,gs,parity", FLOAT_CASES, ids=[f"{c[0]}x{c[1]}-{c[2]}-g{c[3]}" for c in FLOAT_CASES])
def test_float_path_matches_reference(salr_lib, monkeypatch, n, k, kind, gs, parity, bits, xdt, const):
    rng = np.random.default_rng([n, k, gs, bits, np.dtype(xdt).itemsize, int(const)])
    for i, m in enumerate(FLOAT_ROWS):
        # Rank, bias, threads, kernel set, code distribution and activation rank rotate over the M values.
        rank = (0, 5)[(i + const) % 2]
        bias = (i // 2 + const) % 2 == 0
        threads = 1 + (i + bits // 8) % 2
        alternate_kernel_set(monkeypatch, i + (xdt is np.float16))
        x_shape = (2, 20, k) if m == 40 else (m, k)
        feeds, attrs, wd, scale = _q_case(rng, n, k, kind, x_shape, xdt, bits, gs, rank, bias, parity,
                                          random_codes=i == 2)
        y, model = _run(salr_lib, feeds, attrs, const, threads)
        assert_close(y, reference_output(model, feeds), scale)


@pytest.mark.parametrize("kernels", ["best", "scalar"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("x_shape", [(2, 128), (3, 128), (17, 128), (2, 1, 128)], ids=str)
def test_integer_path_layer_in_a_batch_takes_the_float_path(salr_lib, monkeypatch, x_shape, bits, kernels):
    """A layer the integer path accepts, at M > 1: fp32-accurate."""
    use_kernel_set(monkeypatch, kernels)
    rng = np.random.default_rng([len(x_shape), x_shape[0], bits])
    feeds, attrs, _, scale = _q_case(rng, 64, 128, "2:4", x_shape, np.float32, bits, 32, 3, True)
    y, model = _run(salr_lib, feeds, attrs, True, 2)
    assert_close(y, reference_output(model, feeds), scale)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_empty_activations(salr_lib, bits):
    rng = np.random.default_rng(2)
    for k in (20, 128):
        feeds, attrs, _, _ = _q_case(rng, 9, k, "2:4" if k == 128 else "random", (0, k), np.float32, bits, 32, 2,
                                     True)
        y, _ = _run(salr_lib, feeds, attrs, True)
        assert y.shape == (0, 9)


def test_type_combinations_register(salr_lib):
    """(X, values) in {f32, f16} x {int8 (bits 8), uint8 (bits 4)} bind; float16 values are refused."""
    rng = np.random.default_rng(10)
    for xdt in XDTYPES:
        for bits in BITS:
            feeds, attrs, _, _ = _q_case(rng, 4, 9, "random", (1, 9), xdt, bits, 3, 1, False)
            y, _ = _run(salr_lib, feeds, attrs, False)
            assert y.dtype == np.dtype(xdt) and y.shape == (1, 4)
    feeds, attrs, _, _ = _q_case(rng, 4, 9, "random", (1, 9), np.float32, 8, 3, 1, False, nnz_parity=1)
    feeds["values"] = dequantize_values(feeds["values"], feeds["scales"], 8, 3, feeds["values"].size).astype(np.float16)
    with pytest.raises(Exception):
        _run(salr_lib, feeds, attrs, False)


# ------------------------------------------------------------------------------------------ integer path

# (N, K, group_size) of 2:4 layers the integer path takes at M = 1.
INT_CASES = [(64, 128, 32), (64, 128, 64), (37, 576, 32), (16, 64, 32)]


@pytest.mark.parametrize("const", [True, False], ids=["const", "graph_input"])
@pytest.mark.parametrize("xdt", XDTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("n,k,gs", INT_CASES, ids=[f"{n}x{k}-g{gs}" for n, k, gs in INT_CASES])
def test_integer_path_matches_references(salr_lib, monkeypatch, n, k, gs, bits, xdt, const):
    rng = np.random.default_rng([n, k, gs, bits, np.dtype(xdt).itemsize, int(const), 1])
    for i in range(4):
        rank = (0, 5)[(i + const) % 2]
        bias = (i // 2 + const) % 2 == 0
        threads = 1 + (i // 2 + bits // 8) % 2
        x_shape = (1, 1, k) if i % 2 else (1, k)
        feeds, attrs, wd, scale = _q_case(rng, n, k, "2:4", x_shape, xdt, bits, gs, rank, bias, random_codes=i == 1)
        if i == 3:
            feeds["X"][..., ACTIVATION_BLOCK:2 * ACTIVATION_BLOCK] = 0  # a block of zeros: activation scale 0
            scale = _scale(feeds, wd)
        for kernels in ("best", "scalar"):
            use_kernel_set(monkeypatch, kernels)
            y, model = _run(salr_lib, feeds, attrs, const, threads)
            _assert_int_path(y, feeds, attrs, model, wd, scale)


@pytest.mark.parametrize("xdt", XDTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_integer_path_kernel_sets_agree(salr_lib, monkeypatch, bits, xdt):
    """scalar and avx2 compute the same integers; only the fp32 combination order may differ (~1e-5)."""
    if not _cpu_has_avx2():
        pytest.skip("this CPU has no AVX2")
    rng = np.random.default_rng([bits, np.dtype(xdt).itemsize, 5])
    for threads in (1, 2):
        feeds, attrs, _, scale = _q_case(rng, 37, 576, "2:4", (1, 576), xdt, bits, 32, 5, True)
        ys = {}
        for kernels in ("scalar", "avx2"):
            use_kernel_set(monkeypatch, kernels)
            ys[kernels], _ = _run(salr_lib, feeds, attrs, True, threads)
        assert_close(ys["avx2"], ys["scalar"], scale)


@pytest.mark.parametrize("kernels", ["best", "scalar"])
@pytest.mark.parametrize("xdt", XDTYPES, ids=lambda d: np.dtype(d).name)
def test_integer_path_rounds_activations_half_to_even(salr_lib, monkeypatch, xdt, kernels):
    """Activations that fall exactly halfway between two int8 steps round to the even one.

    Block 0 has max |x| = 127 (scale 1) and x = +-(j + 0.5); block 1 max 254 (scale 2) and x = +-(2j + 1);
    block 2 is all zero (scale 0); every value is exact in fp16 and every division exact in fp32."""
    use_kernel_set(monkeypatch, kernels)
    rng = np.random.default_rng(21)
    k = 128
    feeds, attrs, wd, _ = _q_case(rng, 48, k, "2:4", (1, k), xdt, 8, 32, 0, False)
    x = np.zeros(k, dtype=np.float64)
    sign = rng.choice([-1.0, 1.0], size=k)
    x[0:32] = sign[0:32] * (rng.integers(0, 60, 32) + 0.5)
    x[1] = 127.0
    x[32:64] = sign[32:64] * (2 * rng.integers(0, 60, 32) + 1)
    x[33] = -254.0
    x[96:128] = rng.standard_normal(32)
    feeds["X"] = x.astype(xdt).reshape(1, k)
    scale = _scale(feeds, wd)
    y, model = _run(salr_lib, feeds, attrs, True)
    bound = activation_quantization_bound(feeds["X"], wd)
    try:
        assert_close(y, _int_reference(feeds, attrs), scale + bound)
    except AssertionError as e:
        # What rounding halves away from zero would give (q = sign(x/s) floor(|x/s| + 1/2), s = 1, 2, 0, ...).
        _, s = quantize_activations(feeds["X"].reshape(1, k))
        s = np.repeat(s[0].astype(np.float64), ACTIVATION_BLOCK)
        r = np.divide(x, s, out=np.zeros(k), where=s > 0)
        away = ((np.sign(r) * np.floor(np.abs(r) + 0.5) * s) @ wd.T).astype(xdt).reshape(1, -1)
        if np.allclose(y, away, rtol=2e-3, atol=1e-3 * scale.max()):
            raise AssertionError(f"{e}\n(the output matches round-half-away-from-zero activations)") from None
        raise
    assert_close(y, reference_output(model, feeds), scale, extra=1.001 * bound)


# ------------------------------------------------------------------------------------------ malformed input


def _qv1_case(v1_name, bits, fragments):
    """A format-v1 malformed case (ort_helpers.malformed_v1_cases), reused on SALRLinearQ."""
    mutate = {name: fn for name, fn, _ in malformed_v1_cases()}[v1_name]

    def apply(f, attrs):
        f2, k = mutate(f)
        f.update(f2)
        attrs[IN_FEATURES_ATTR] = k
        return []

    return v1_name, bits, apply, fragments


def _q_malformed_cases():
    """(name, bits of the base layer, mutate(feeds, attrs) -> extra fragments, required fragments).

    A fragment is a string the message must contain, or a tuple of alternatives. The base layer is 12 x 21,
    group_size 5, with an odd number of kept entries; the numbers the mutations return are the expected and
    the received count, which a message saying 'expected E, got G' contains."""

    def nnz(f):
        return int(f["row_offsets"][-1])

    def scales_long(f, a):
        c = f["scales"].shape[0]
        f["scales"] = np.concatenate([f["scales"], np.ones(1, np.float16)])
        return [str(c), str(c + 1)]

    def scales_short(f, a):
        c = f["scales"].shape[0]
        f["scales"] = f["scales"][:-1]
        return [str(c), str(c - 1)]

    def scales_rank2(f, a):
        f["scales"] = f["scales"].reshape(-1, 1)
        return []

    def scales_f32(f, a):
        f["scales"] = f["scales"].astype(np.float32)
        return []

    def values_long(f, a):
        c = f["values"].shape[0]
        f["values"] = np.concatenate([f["values"], f["values"][:1]])
        return [str(c), str(c + 1)]

    def values_short(f, a):
        c = f["values"].shape[0]
        f["values"] = f["values"][:-1]
        return [str(c), str(c - 1)]

    def values_rank2(f, a):
        f["values"] = f["values"].reshape(1, -1)
        return []

    def high_nibble(f, a):
        assert nnz(f) % 2 == 1
        v = f["values"].copy()
        v[-1] |= np.uint8(0x30)
        f["values"] = v
        return []

    def attr(name, value):
        def set_attr(f, a):
            a[name] = value
            return []

        return set_attr

    def drop(name):
        def drop_attr(f, a):
            del a[name]
            return []

        return drop_attr

    def values_of_other_width(f, a):  # int8 values under bits = 4, uint8 ones under bits = 8
        a[BITS_ATTR] = 12 - a[BITS_ATTR]
        return []

    return [
        ("scales_count_long", 8, scales_long, ["scales"]),
        ("scales_count_short", 4, scales_short, ["scales"]),
        ("scales_rank_2", 8, scales_rank2, ["scales"]),
        ("scales_float32", 8, scales_f32, []),  # ORT's type check or ours: the op name is all we require
        ("int4_values_long", 4, values_long, ["values"]),
        ("int4_values_short", 4, values_short, ["values"]),
        ("int8_values_long", 8, values_long, ["values"]),
        ("int8_values_short", 8, values_short, ["values"]),
        ("values_rank_2", 4, values_rank2, ["values"]),
        ("int4_unused_high_nibble", 4, high_nibble, ["values"]),
        ("bits_5", 8, attr(BITS_ATTR, 5), ["bits", "5"]),
        ("bits_4_int8_values", 8, values_of_other_width, ["bits", "values"]),
        ("bits_8_uint8_values", 4, values_of_other_width, ["bits", "values"]),
        ("group_size_0", 8, attr(GROUP_SIZE_ATTR, 0), ["group_size"]),
        ("group_size_negative", 4, attr(GROUP_SIZE_ATTR, -32), ["group_size"]),
        ("missing_bits", 8, drop(BITS_ATTR), ["bits"]),
        ("missing_group_size", 4, drop(GROUP_SIZE_ATTR), ["group_size"]),
        ("missing_in_features", 8, drop(IN_FEATURES_ATTR), ["in_features"]),
        _qv1_case("offsets_start", 4, ["row_offsets"]),
        _qv1_case("offsets_decreasing", 8, ["row_offsets"]),
        _qv1_case("popcount", 4, ["popcount"]),
        _qv1_case("padding_bits", 8, ["padding"]),
        _qv1_case("bitmap_width", 4, ["bitmap"]),
        _qv1_case("in_features", 8, ["in_features"]),
        _qv1_case("x_last_dim", 4, ["'X'"]),
        _qv1_case("offsets_length", 8, ["row_offsets"]),
        _qv1_case("adapter_k", 4, ["A_cat"]),
        _qv1_case("adapter_rank", 8, ["B_cat"]),
        _qv1_case("bias_length", 4, ["bias"]),
    ]


@pytest.mark.parametrize("const", [True, False], ids=["const", "graph_input"])
@pytest.mark.parametrize("name,bits,mutate,fragments", _q_malformed_cases(), ids=[c[0] for c in _q_malformed_cases()])
def test_malformed_inputs_raise(salr_lib, name, bits, mutate, fragments, const):
    """An ORT error naming the op, the input or attribute, and (for counts) the expected and received number:
    at session creation for constant initializers, at run for graph inputs (attributes: always at creation)."""
    rng = np.random.default_rng(7)
    feeds, attrs, _, _ = _q_case(rng, 12, 21, "random", (3, 21), np.float32, bits, 5, 2, True, nnz_parity=1)
    feeds, attrs = dict(feeds), dict(attrs)
    required = fragments + mutate(feeds, attrs)
    model, run_feeds = make_model(SALR_LINEAR_Q, feeds, set(feeds) - {"X"} if const else set(), attrs, np.float32)
    with pytest.raises(Exception) as info:
        make_session(salr_lib, model).run(None, run_feeds)
    msg = str(info.value)
    assert SALR_LINEAR_Q in msg, msg
    missing = [f for f in required if f not in msg]
    assert not missing, f"message lacks {missing}: {msg}"


def test_random_malformed_inputs_never_crash(salr_lib):
    """The in-suite fuzz pass on SALRLinearQ alone (sanitize_fuzz.sh runs all ops, thousands of cases)."""
    from .fuzz import run_fuzz

    stats = run_fuzz(salr_lib, cases=60, seed=12, ops=(SALR_LINEAR_Q,))
    q = stats["by_op"][SALR_LINEAR_Q]
    assert stats["crashes"] == 0 and stats["cases"] == 60
    assert q["accepted"] > 0 and q["rejected"] > 0, stats


# ------------------------------------------------------------------------------------------ the references


def test_quantizer_golden_int4():
    """Pins the int4 packing (low nibble first, +8) and the scale rounding (fp16 of max|v| / 7)."""
    stored, scales = quantize_values(np.array([7.0, -3.0, 0.5, -1.0, 14.0], np.float32), 4, 2)
    assert scales.dtype == np.float16 and scales.tolist() == [1.0, float(np.float16(1 / 7)), 2.0]
    # codes 7, -3 | 4 (0.5 / fp16(1/7) = 3.5008), -7 | 7 -> nibbles 15, 5, 12, 1, 15, then an unused 0
    assert stored.dtype == np.uint8 and stored.tolist() == [0x5F, 0x1C, 0x0F]
    assert unpack_codes(stored, 4, 5).tolist() == [7, -3, 4, -7, 7]


def test_quantizer_golden_int8():
    stored, scales = quantize_values(np.array([127.0, -63.5, 0.0, 1.0], np.float32), 8, 3)
    assert scales.tolist() == [1.0, float(np.float16(1 / 127))]
    assert stored.dtype == np.int8 and stored.tolist() == [127, -64, 0, 127]  # -63.5: ties to even


def test_pack_codes_full_int4_range():
    codes = np.array([-8, 7, 0, -1, 3])
    stored = pack_codes(codes, 4)
    assert stored.tolist() == [0xF0, 0x78, 0x0B]  # nibbles 0, 15 | 8, 7 | 11, unused 0
    assert unpack_codes(stored, 4, 5).tolist() == codes.tolist()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [1, 7, 32, 1000])
@pytest.mark.parametrize("nnz", [0, 1, 63, 64, 301])
def test_quantize_dequantize_round_trip(bits, group_size, nnz):
    rng = np.random.default_rng([bits, group_size, nnz])
    v = (rng.standard_normal(nnz) * rng.choice([1e-3, 1.0, 30.0], nnz)).astype(np.float32)
    stored, scales = quantize_values(v, bits, group_size)
    assert scales.shape == (-(-nnz // group_size),) and scales.dtype == np.float16
    assert stored.shape == ((nnz,) if bits == 8 else ((nnz + 1) // 2,))
    assert stored.dtype == (np.int8 if bits == 8 else np.uint8)
    if bits == 4 and nnz % 2:
        assert stored[-1] >> 4 == 0
    d = dequantize_values(stored, scales, bits, group_size, nnz)
    s = np.repeat(scales.astype(np.float64), group_size)[:nnz]
    # Half a step, plus the clip when the fp16-rounded scale came out below max|v| / qmax.
    qmax = 127 if bits == 8 else 7
    amax = np.repeat([np.abs(v[i:i + group_size]).max() for i in range(0, nnz, group_size)], group_size)[:nnz]
    assert np.all(np.abs(d - v) <= np.maximum(s / 2, amax - qmax * s) * (1 + 1e-6) + 1e-30)
    codes = unpack_codes(stored, bits, nnz)
    assert np.array_equal(d, (codes * s).astype(np.float32))
    assert np.array_equal(d.astype(np.float64), codes * s)  # exact in fp32


def test_quantize_activations_ties_and_zero_blocks():
    x = np.zeros((1, 64), np.float32)
    x[0, :4] = [127.0, 0.5, 1.5, -2.5]
    q, s = quantize_activations(x)
    assert s.tolist() == [[1.0, 0.0]] and q[0, :4].tolist() == [127, 0, 2, -2] and not q[0, 4:].any()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("xdt", XDTYPES, ids=lambda d: np.dtype(d).name)
def test_int_path_reference_is_close_to_exact(bits, xdt):
    """The integer-path restatement differs from the exact reference by activation rounding only:
    within its bound, and < 2% of the output's size."""
    rng = np.random.default_rng([bits, np.dtype(xdt).itemsize])
    for m in (1, 3):
        feeds, attrs, wd, _ = _q_case(rng, 37, 576, "2:4", (m, 576), xdt, bits, 32, 5, True)
        model, _ = make_model(SALR_LINEAR_Q, feeds, set(), attrs, xdt)
        exact = reference_output(model, feeds).astype(np.float64)
        approx = _int_reference(feeds, attrs).astype(np.float64)
        bound = activation_quantization_bound(feeds["X"], wd)
        fp16 = 2e-3 * np.abs(exact) if xdt is np.float16 else 0
        assert np.all(np.abs(approx - exact) <= 1.001 * bound + fp16 + 1e-9)
        weight_term = feeds["X"].astype(np.float64) @ wd.T
        assert np.linalg.norm(approx - exact) < 0.02 * np.linalg.norm(weight_term)
        assert np.linalg.norm(approx - exact) > 0  # the activations really were rounded


def test_int_path_reference_is_exact_on_representable_activations():
    """Integer activations with a +-127 in every block quantize exactly: the two references agree."""
    rng = np.random.default_rng(3)
    k = 128
    feeds, attrs, wd, _ = _q_case(rng, 20, k, "2:4", (1, k), np.float32, 4, 64, 2, True)
    x = rng.integers(-127, 128, (1, k)).astype(np.float32)
    x[0, ::ACTIVATION_BLOCK] = 127
    feeds["X"] = x
    model, _ = make_model(SALR_LINEAR_Q, feeds, set(), attrs, np.float32)
    np.testing.assert_allclose(_int_reference(feeds, attrs), reference_output(model, feeds), rtol=1e-6, atol=1e-5)


def test_int_path_reference_refuses_layers_the_path_does_not_take():
    rng = np.random.default_rng(4)
    feeds, attrs, _, _ = _q_case(rng, 8, 64, "2:4", (1, 64), np.float32, 8, 24, 0, False)
    with pytest.raises(ValueError, match="two scale groups"):
        _int_reference(feeds, attrs)
