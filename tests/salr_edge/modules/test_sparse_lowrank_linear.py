import pytest
import torch
from torch import nn

from salr_edge.formats.bitmap import bitmap_decode
from salr_edge.modules.sparse_lowrank_linear import SparseLowRankLinear


def _module(bias=True, n=30, k=21):
    lin = nn.Linear(k, n, bias=bias)
    dense = lin.weight.detach().clone()
    mask = torch.rand(n, k) > 0.5
    m = SparseLowRankLinear(lin, mask)
    m.add_adapter("residual", torch.randn(3, k), torch.randn(n, 3), scaling=1.0)
    m.add_adapter("lora", torch.randn(2, k), torch.randn(n, 2), scaling=0.5)
    return m, dense, mask


def test_forward_equals_masked_dense_plus_scaled_adapters():
    m, dense, mask = _module()
    x = torch.randn(4, 5, 21)
    delta = m.salr_B["residual"] @ m.salr_A["residual"] + 0.5 * m.salr_B["lora"] @ m.salr_A["lora"]
    expected = x @ (dense * mask + delta).T + m.bias
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)


def test_base_is_frozen_and_exactly_sparse():
    m, _, mask = _module()
    assert not m.base_layer.weight.requires_grad
    assert bool((m.base_layer.weight[~mask] == 0).all())


def test_fused_adapters_concatenate_in_order_with_scaling_in_b():
    m, _, _ = _module()
    a_cat, b_cat = m.fused_adapters()
    assert a_cat.shape == (5, 21) and b_cat.shape == (30, 5)
    torch.testing.assert_close(b_cat[:, 3:], 0.5 * m.salr_B["lora"])
    torch.testing.assert_close(b_cat @ a_cat, m.get_delta_weight())


def test_merge_then_unmerge_restores_sparse_base_and_output():
    m, _, mask = _module()
    x = torch.randn(3, 21)
    before = m(x)
    m.merge(safe_merge=True)
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)
    m.merge()  # idempotent
    m.unmerge()
    assert bool((m.base_layer.weight[~mask] == 0).all())
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_nan_adapters():
    m, _, _ = _module()
    with torch.no_grad():
        m.salr_B["lora"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.merge(safe_merge=True)


def test_lora_init_leaves_output_unchanged():
    lin = nn.Linear(16, 8)
    m = SparseLowRankLinear(lin, torch.ones(8, 16, dtype=torch.bool))
    x = torch.randn(2, 16)
    before = m(x)
    m.add_lora("lora", rank=4, alpha=8)
    torch.testing.assert_close(m(x), before)
    assert m.salr_scaling["lora"] == 2.0


def test_empty_adapters_give_plain_sparse_layer():
    m = SparseLowRankLinear(nn.Linear(9, 4, bias=False))
    a_cat, b_cat = m.fused_adapters()
    assert a_cat.shape == (0, 9) and b_cat.shape == (4, 0)
    x = torch.randn(2, 9)
    torch.testing.assert_close(m(x), x @ m.weight.T)


def test_trainable_flags_per_adapter():
    m, _, _ = _module()
    m.set_adapter_trainable("residual", False)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"salr_A.lora", "salr_B.lora"}


def test_bitmap_round_trip_rebuilds_the_same_layer():
    m, _, _ = _module()
    rebuilt = SparseLowRankLinear.from_bitmap(m.to_bitmap(), m.bias.detach())
    assert torch.equal(rebuilt.weight, m.weight)
    assert torch.equal(bitmap_decode(m.to_bitmap()), m.sparse_weight())


def test_adapter_shape_mismatch_is_rejected():
    m, _, _ = _module()
    with pytest.raises(ValueError, match="expected A"):
        m.add_adapter("bad", torch.randn(2, 20), torch.randn(30, 2))


# ---- quantized base -------------------------------------------------------------------------------
def _quantized(bits=4, group_size=8):
    m, dense, mask = _module()
    m.quantize_base_(bits, group_size)
    return m, dense, mask


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_weight_is_exactly_the_dequantized_stored_values(bits):
    m, _, mask = _quantized(bits)
    t = m.to_bitmap()
    assert t.bits == bits and t.group_size == 8
    assert torch.equal(m.weight, bitmap_decode(t))
    assert bool((m.weight[~mask] == 0).all())


def test_quantized_forward_uses_the_dequantized_base():
    m, _, _ = _quantized()
    x = torch.randn(2, 3, 21)
    expected = x @ (bitmap_decode(m.to_bitmap()) + m.get_delta_weight()).T + m.bias
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)


def test_quantized_base_is_close_to_the_float_one():
    m, dense, mask = _quantized(8, 4)
    assert float((m.weight - dense * mask).abs().max()) <= float(dense.abs().max()) / 127


def test_to_bitmap_returns_the_stored_integers_without_requantizing():
    m, _, _ = _quantized()
    stored, scales = m.salr_qvalues.clone(), m.salr_qscales.clone()
    with torch.no_grad():
        m.base_layer.weight.mul_(1.01)  # a drifted float weight must not leak into the stored format
    t = m.to_bitmap(torch.float32)  # values_dtype applies to float bases only
    assert torch.equal(t.values, stored) and torch.equal(t.scales, scales)


def test_quantized_bitmap_round_trip_rebuilds_the_same_layer():
    m, _, _ = _quantized()
    t = m.to_bitmap()
    rebuilt = SparseLowRankLinear.from_bitmap(t, m.bias.detach())
    assert rebuilt.bits == 4 and rebuilt.group_size == 8
    assert torch.equal(rebuilt.weight, m.weight)
    assert torch.equal(rebuilt.salr_qvalues, t.values) and torch.equal(rebuilt.salr_qscales, t.scales)


def test_quantizing_twice_is_refused():
    m, _, _ = _quantized()
    with pytest.raises(ValueError, match="already quantized \\(int4, group_size 8\\)"):
        m.quantize_base_(8, 8)


def test_unmerge_restores_the_exact_dequantized_base():
    m, _, _ = _quantized()
    before = m.weight.clone()
    m.merge()
    m.unmerge()
    assert torch.equal(m.weight, before)


def test_float_casts_of_the_model_keep_the_scales_fp16():
    m, _, _ = _quantized()
    scales = m.salr_qscales.clone()
    m.to(torch.bfloat16)
    assert m.salr_qscales.dtype == torch.float16 and torch.equal(m.salr_qscales, scales)
    assert m.salr_qvalues.dtype == torch.uint8 and m.weight.dtype == torch.bfloat16


def test_quantized_buffers_are_in_the_state_dict():
    m, _, _ = _quantized()
    assert {"salr_qvalues", "salr_qscales"} <= set(m.state_dict())
    assert "salr_qvalues" not in SparseLowRankLinear(nn.Linear(4, 3)).state_dict()
