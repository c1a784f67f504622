import pytest
import torch

from salr_edge.formats.quantize import (DEFAULT_CLIP_RATIOS, dequantize_values, pack_int4, quantize_values,
                                        stored_to_int, unpack_int4)


def test_pack_int4_puts_value_0_in_the_low_nibble():
    assert pack_int4(torch.tensor([-8, 7], dtype=torch.int8)).tolist() == [0xF0]  # nibbles 0 (low) and 15 (high)


def test_pack_int4_leaves_the_unused_high_nibble_of_an_odd_length_zero():
    assert pack_int4(torch.tensor([3, -1, 7], dtype=torch.int8)).tolist() == [11 | 7 << 4, 15]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 101])
def test_int4_pack_unpack_round_trip(n):
    q = torch.randint(-8, 8, (n,), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_int4(packed, n), q)


def test_pack_int4_refuses_values_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 7\], got \[-9, 0\]"):
        pack_int4(torch.tensor([-9, 0], dtype=torch.int8))


def test_unpack_int4_refuses_a_wrong_length():
    with pytest.raises(ValueError, match="5 int4 values need 3 bytes, got 2"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), 5)


@pytest.mark.parametrize("bits, dtype, q_min, q_max", [(8, torch.int8, -127, 127), (4, torch.uint8, -8, 7)])
@pytest.mark.parametrize("nnz, group_size", [(1000, 32), (999, 7), (5, 64), (33, 1)])
def test_quantize_values_stores_integers_in_range_and_one_fp16_scale_per_group(bits, dtype, q_min, q_max, nnz,
                                                                                group_size):
    v = torch.randn(nnz) * torch.rand(nnz) * 3
    stored, scales = quantize_values(v, bits, group_size)
    assert stored.dtype == dtype and stored.numel() == (nnz if bits == 8 else (nnz + 1) // 2)
    assert scales.dtype == torch.float16 and scales.numel() == -(-nnz // group_size)
    q = stored_to_int(stored, bits, nnz)
    assert int(q.min()) >= q_min and int(q.max()) <= q_max


def _group_errors(v, stored, scales, bits, group_size):
    err = (dequantize_values(stored, scales, bits, group_size, v.numel()) - v).square()
    padded = torch.zeros(scales.numel() * group_size)
    padded[:v.numel()] = err
    return padded.reshape(-1, group_size).sum(1)


@pytest.mark.parametrize("bits", [4, 8])
def test_scale_search_matches_a_per_group_reference(bits):
    """Per group, the chosen fp16 scale has the least error over the grid, measured with that fp16 scale."""
    q_max = 7 if bits == 4 else 127
    q_min = -8 if bits == 4 else -127
    group_size = 8
    v = torch.randn(8 * 12) * torch.linspace(0.01, 4, 8 * 12)
    v[3] = 9.0  # an outlier, so clipping pays off for its group
    _, scales = quantize_values(v, bits, group_size)
    for g, group in enumerate(v.reshape(-1, group_size)):
        best = None
        for ratio in DEFAULT_CLIP_RATIOS.tolist():
            scale = torch.tensor(float(group.abs().max()) * ratio / q_max).half().float()
            q = torch.round(group / scale).clamp(q_min, q_max)
            err = float((q * scale - group).square().sum())
            if best is None or err < best[0]:
                best = (err, scale)
        assert float(scales[g]) == float(best[1]), g


@pytest.mark.parametrize("bits", [4, 8])
def test_scale_search_is_no_worse_than_the_absmax_scale_in_any_group(bits):
    v = torch.randn(4096) ** 3  # heavy tails
    stored, scales = quantize_values(v, bits, 32)
    plain_stored, plain_scales = quantize_values(v, bits, 32, clip_ratios=torch.tensor([1.0]))
    assert bool((_group_errors(v, stored, scales, bits, 32) <= _group_errors(v, plain_stored, plain_scales, bits,
                                                                              32)).all())


def test_clipping_pays_off_for_int4_on_heavy_tails():
    v = torch.randn(4096) ** 3
    stored, scales = quantize_values(v, 4, 32)
    plain_stored, plain_scales = quantize_values(v, 4, 32, clip_ratios=torch.tensor([1.0]))
    assert bool((scales < plain_scales).any())
    searched = float(_group_errors(v, stored, scales, 4, 32).sum())
    assert searched < 0.95 * float(_group_errors(v, plain_stored, plain_scales, 4, 32).sum())


def test_dequantize_is_q_times_the_scale_of_its_group():
    q = torch.tensor([1, -2, 3, -127, 127], dtype=torch.int8)
    scales = torch.tensor([0.5, 0.125], dtype=torch.float16)
    assert dequantize_values(q, scales, 8, 3).tolist() == [0.5, -1.0, 1.5, -127 * 0.125, 127 * 0.125]


def test_an_all_zero_group_gets_scale_zero_and_no_nan():
    v = torch.cat([torch.zeros(4), torch.ones(4)])
    stored, scales = quantize_values(v, 8, 4)
    assert float(scales[0]) == 0.0
    values = dequantize_values(stored, scales, 8, 4)
    assert values[:4].tolist() == [0.0] * 4 and bool(torch.isfinite(values).all())


def test_no_values_give_no_scales():
    stored, scales = quantize_values(torch.zeros(0), 4, 32)
    assert stored.numel() == 0 and scales.numel() == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5, group_size=32), "bits must be one of \\(4, 8\\), got 5"),
    (dict(bits=4, group_size=0), "group_size must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_values(torch.randn(8), **kwargs)


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_values(torch.tensor([1.0, float("nan")]), 8, 32)
