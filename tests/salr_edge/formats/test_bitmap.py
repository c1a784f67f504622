import pytest
import torch

from salr_edge.formats.bitmap import (BitmapFormatError, BitmapTensor, bitmap_decode, bitmap_encode, packed_width,
                                      validate)


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
