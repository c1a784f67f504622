import pytest
import torch

from salr_edge.formats.bitmap import (BitmapFormatError, BitmapTensor, bitmap_decode, bitmap_encode, packed_width,
                                      quantize_bitmap, stored_layer_bytes, validate)
from salr_edge.formats.quantize import dequantize_values


def test_golden_bytes_pin_bit_order_values_and_offsets():
    w = torch.tensor([[1.0, 0, 0, 2.0, 0, 0, 0, 0, 3.0, 0],
                      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                      [4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0]])
    t = bitmap_encode(w, values_dtype=torch.float16)
    assert t.bitmap.tolist() == [[0b00001001, 0b00000001], [0, 0], [0xFF, 0b00000011]]
    assert t.values.dtype == torch.float16
    assert t.values.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert t.row_offsets.tolist() == [0, 3, 3, 13]
    assert bytes(t.values.numpy().tobytes()[:4]) == bytes.fromhex("003c0040")  # fp16 1.0, 2.0 little-endian


@pytest.mark.parametrize("shape", [(830, 545), (511, 350), (7, 3), (1, 1), (4, 8), (3, 17)])
def test_round_trip_on_odd_shapes(shape):
    w = torch.randn(shape) * (torch.rand(shape) > 0.5)
    w[0] = 0  # an all-zero row
    w[-1] = torch.randn(shape[1]).abs() + 0.1  # a fully dense row
    t = bitmap_encode(w)
    validate(t)
    assert t.bitmap.shape == (shape[0], packed_width(shape[1]))
    assert torch.equal(bitmap_decode(t), w)


def test_explicit_mask_keeps_zero_values():
    w = torch.zeros(2, 9)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 8] = True
    t = bitmap_encode(w, mask)
    assert t.nnz == 1 and t.row_offsets.tolist() == [0, 0, 1]


def test_nbytes_counts_bitmap_values_and_offsets():
    t = bitmap_encode(torch.ones(4, 16), values_dtype=torch.float16)
    assert t.nbytes() == 4 * 2 + 64 * 2 + 5 * 8


def _broken(**changes):
    t = bitmap_encode(torch.tensor([[1.0, 0, 2.0], [0, 3.0, 0]]))
    fields = dict(bitmap=t.bitmap.clone(), values=t.values.clone(), row_offsets=t.row_offsets.clone(), shape=t.shape)
    fields.update(changes)
    return BitmapTensor(**fields)


@pytest.mark.parametrize("changes, message", [
    (dict(shape=(2, 9)), "bitmap shape"),
    (dict(row_offsets=torch.tensor([1, 2, 3])), "row_offsets\\[0\\]"),
    (dict(row_offsets=torch.tensor([0, 3, 2])), "decrease"),
    (dict(row_offsets=torch.tensor([0, 2, 2])), "len\\(values\\)"),
    (dict(row_offsets=torch.tensor([0, 1, 3])), "set bits"),
    (dict(bitmap=torch.tensor([[0b1101], [0b010]], dtype=torch.uint8), values=torch.ones(4),
          row_offsets=torch.tensor([0, 3, 4])), "padding bits"),
    (dict(bitmap=torch.tensor([[5], [2]], dtype=torch.int32)), "uint8"),
    (dict(row_offsets=torch.tensor([0, 2, 3], dtype=torch.int32)), "int64"),
    (dict(values=torch.ones(3, dtype=torch.int8)), "values dtype"),
])
def test_validate_names_each_broken_invariant(changes, message):
    with pytest.raises(BitmapFormatError, match=message):
        validate(_broken(**changes))


def test_decode_refuses_malformed_input():
    with pytest.raises(BitmapFormatError):
        bitmap_decode(_broken(row_offsets=torch.tensor([0, 1, 3])))


# ---- version 2: quantized values ------------------------------------------------------------------
# The golden matrix of version 1's test with values on exact grids: every group's largest |v| is q_max
# times a power of two, so the scale search keeps that scale and the bytes can be written by hand.
# Storage order: row 0 keeps columns 0, 3, 8; row 1 nothing; row 2 all ten. Groups of 4 span rows 0-2.
_GOLDEN_MASK = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 1, 0], [0] * 10, [1] * 10], dtype=torch.bool)


def _golden(values):
    w = torch.zeros(3, 10)
    w[_GOLDEN_MASK] = torch.tensor(values)
    return bitmap_encode(w)


def test_golden_bytes_pin_int4_nibble_order_and_scales():
    q = [7, -3, 1, -7, 1, 2, 3, 7, -7, -1, 5, 6, 7]
    scales = [0.25] * 4 + [0.5] * 4 + [2.0] * 4 + [0.125]
    t = quantize_bitmap(_golden([a * s for a, s in zip(q, scales)]), bits=4, group_size=4)
    assert t.bitmap.tolist() == [[0b00001001, 0b00000001], [0, 0], [0xFF, 0b00000011]]
    assert t.row_offsets.tolist() == [0, 3, 3, 13]  # counts values, not bytes
    # nibble u = q + 8, value i in nibble i % 2 (low first) of byte i // 2; nnz = 13: last high nibble 0
    assert t.values.dtype == torch.uint8 and t.values.numpy().tobytes() == bytes.fromhex("5f19a9fb71ed0f")
    assert t.scales.dtype == torch.float16
    assert t.scales.numpy().tobytes() == bytes.fromhex("0034" "0038" "0040" "0030")  # 0.25 0.5 2 0.125, LE
    assert t.format_name == "salr-bitmap-v2" and t.format_version == 2 and t.nnz == 13


def test_golden_bytes_pin_int8_values_and_scales():
    q = [127, -3, 1, -127, 1, 2, -100, 127, -127, -1, 5, 6, 127]
    scales = [2.0 ** -6] * 4 + [2.0 ** -7] * 4 + [1.0] * 4 + [2.0 ** -10]
    t = quantize_bitmap(_golden([a * s for a, s in zip(q, scales)]), bits=8, group_size=4)
    assert t.values.dtype == torch.int8
    assert t.values.numpy().tobytes() == bytes.fromhex("7ffd0181" "01029c7f" "81ff0506" "7f")  # two's complement
    assert t.scales.numpy().tobytes() == bytes.fromhex("0024" "0020" "003c" "0014")
    assert t.row_offsets.tolist() == [0, 3, 3, 13]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, group_size", [((830, 545), 32), ((511, 350), 7), ((7, 3), 64), ((3, 17), 1)])
def test_quantized_decode_is_the_dequantized_values_at_kept_positions(bits, shape, group_size):
    w = torch.randn(shape) * (torch.rand(shape) > 0.5)
    w[0] = 0  # an all-zero row
    t = quantize_bitmap(bitmap_encode(w), bits, group_size)
    validate(t)
    dense = bitmap_decode(t)
    assert dense.dtype == torch.float32
    mask = w != 0
    assert bool((dense[~mask] == 0).all())
    assert torch.equal(dense[mask], dequantize_values(t.values, t.scales, bits, group_size, t.nnz))
    step = 1 / 7 if bits == 4 else 1 / 127  # |error| <= half a step of the group max, plus clipping
    assert float((dense - w).abs().max()) <= float(w.abs().max()) * step


def test_quantize_bitmap_shares_bitmap_and_offsets():
    t = bitmap_encode(torch.randn(5, 9) * (torch.rand(5, 9) > 0.3))
    q = quantize_bitmap(t, 8, 4)
    assert q.bitmap is t.bitmap and q.row_offsets is t.row_offsets and t.format_version == 1


def test_quantize_bitmap_refuses_a_quantized_tensor():
    q = quantize_bitmap(bitmap_encode(torch.randn(4, 8)), 4, 8)
    with pytest.raises(BitmapFormatError, match=r"already quantized \(int4, group_size 8\)"):
        quantize_bitmap(q, 8, 8)


def test_cast_of_quantized_values_is_refused():
    with pytest.raises(BitmapFormatError, match="cannot cast the int4 values"):
        quantize_bitmap(bitmap_encode(torch.randn(4, 8)), 4, 8).to(torch.float16)


@pytest.mark.parametrize("bits, shape, group_size", [(4, (4, 16), 8), (4, (7, 13), 5), (8, (830, 545), 32)])
def test_nbytes_counts_packed_values_and_scales(bits, shape, group_size):
    t = quantize_bitmap(bitmap_encode(torch.randn(shape) * (torch.rand(shape) > 0.5)), bits, group_size)
    n, k = shape
    values = (t.nnz + 1) // 2 if bits == 4 else t.nnz
    assert t.nbytes() == n * packed_width(k) + values + 2 * -(-t.nnz // group_size) + 8 * (n + 1)
    assert stored_layer_bytes(n, k, t.nnz, bits=bits, group_size=group_size) == t.nbytes()
    assert stored_layer_bytes(n, k, t.nnz, rank=3, bits=bits, group_size=group_size) == t.nbytes() + 3 * (n + k) * 2


def _broken_v2(quant_bits=4, **changes):
    w = torch.tensor([[1.0, 0, 2.0], [0, 3.0, 0], [4.0, 5.0, 0]])  # nnz = 5: odd, three groups of 2
    t = quantize_bitmap(bitmap_encode(w), quant_bits, 2)
    fields = dict(bitmap=t.bitmap, values=t.values.clone(), row_offsets=t.row_offsets, shape=t.shape,
                  scales=t.scales.clone(), bits=t.bits, group_size=t.group_size)
    fields.update(changes)
    return BitmapTensor(**fields)


def _high_nibble_set():
    t = _broken_v2()
    t.values[-1] |= 0x30
    return t


@pytest.mark.parametrize("make, message", [
    (lambda: _broken_v2(scales=torch.ones(2, dtype=torch.float16)), r"scales must have shape \(3,\)"),
    (lambda: _broken_v2(scales=torch.ones(3)), "scales must be float16, got torch.float32"),
    (lambda: _broken_v2(scales=None), "need scales"),
    (lambda: _broken_v2(scales=torch.tensor([1.0, float("inf"), 1.0], dtype=torch.float16)), "NaN or Inf"),
    (lambda: _broken_v2(values=torch.zeros(3, dtype=torch.int8)), "int4 values must be stored as torch.uint8"),
    (lambda: _broken_v2(values=torch.zeros(5, dtype=torch.uint8)), r"ceil\(nnz/2\)=3 stored elements, got 5"),
    (lambda: _broken_v2(8, values=torch.zeros(4, dtype=torch.int8)), "nnz=5 stored elements, got 4"),
    (lambda: _broken_v2(8, values=torch.tensor([1, 2, -128, 3, 4], dtype=torch.int8)), "-128"),
    (lambda: _broken_v2(bits=5), "unknown bits value 5"),
    (lambda: _broken_v2(group_size=0), "group_size must be an integer >= 1, got 0"),
    (_high_nibble_set, r"unused high nibble of the last byte \(nnz=5 is odd\) must be 0, got 3"),
    (lambda: _broken_v2(bits=None), "scales/group_size are given but bits is None"),
])
def test_validate_names_each_broken_v2_invariant(make, message):
    with pytest.raises(BitmapFormatError, match=message):
        validate(make())
