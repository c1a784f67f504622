import pytest
import torch

from salr_edge.algorithms.salr import compress_linear
from salr_edge.api import compress_, unload
from salr_edge.config import SALRConfig
from salr_edge.modules.sparse_lowrank_linear import SparseLowRankLinear, iter_sparse_lowrank


def test_tiny_model_reaches_target_sparsity_in_every_targeted_layer(tiny_llama):
    compress_(tiny_llama, SALRConfig(sparsity=0.5, rank=4, lora_rank=2), show_progress=False)
    layers = dict(iter_sparse_lowrank(tiny_llama))
    assert len(layers) == 2 * 7  # q k v o gate up down per decoder layer; lm_head excluded
    for module in layers.values():
        density = float((module.weight != 0).float().mean())
        assert abs(density - 0.5) < 0.01


def test_only_adapters_are_trainable(tiny_llama):
    compress_(tiny_llama, SALRConfig(rank=4, lora_rank=2), show_progress=False)
    names = [n for n, p in tiny_llama.named_parameters() if p.requires_grad]
    assert names and all(".salr_A." in n or ".salr_B." in n for n in names)


def test_frozen_residual_option(tiny_llama):
    compress_(tiny_llama, SALRConfig(rank=4, lora_rank=2, train_residual=False), show_progress=False)
    names = [n for n, p in tiny_llama.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".lora") for n in names)


def test_model_at_step_zero_equals_base_plus_residual(tiny_llama):
    ids = torch.randint(0, 128, (1, 12))
    compress_(tiny_llama, SALRConfig(rank=4, lora_rank=0), show_progress=False)
    without_lora = tiny_llama(ids).logits
    for _, m in iter_sparse_lowrank(tiny_llama):
        m.add_lora("lora", 2, 4.0)
    torch.testing.assert_close(tiny_llama(ids).logits, without_lora)


def test_residual_adapter_reduces_layer_error():
    lin = torch.nn.Linear(64, 48)
    dense = lin.weight.detach().clone()
    module = compress_linear(lin, SALRConfig(rank=16, lora_rank=0))
    pruned_err = (dense - module.sparse_weight()).norm()
    recovered_err = (dense - module.sparse_weight() - module.get_delta_weight()).norm()
    assert recovered_err < pruned_err * (1 - 16 / 48) ** 0.5 + 1e-5


def test_wanda_needs_calibration_data(tiny_llama):
    with pytest.raises(ValueError, match="calib_data"):
        compress_(tiny_llama, SALRConfig(pruning="wanda"), show_progress=False)


def test_wanda_with_calibration_data(tiny_llama):
    calib = [torch.randint(0, 128, (1, 16)) for _ in range(2)]
    compress_(tiny_llama, SALRConfig(pruning="wanda", granularity="2:4", rank=2, lora_rank=0),
              calib_data=calib, show_progress=False)
    assert len(list(iter_sparse_lowrank(tiny_llama))) == 14


def test_rank_above_layer_size_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="exceeds min"):
        compress_(tiny_llama, SALRConfig(rank=65), show_progress=False)


def test_targets_that_match_nothing_are_rejected(tiny_llama):
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        compress_(tiny_llama, SALRConfig(target_modules=["nonexistent"]), show_progress=False)


def test_unknown_config_type_is_rejected(tiny_llama):
    with pytest.raises(TypeError, match="no compression handler"):
        compress_(tiny_llama, object())


def test_unload_restores_plain_linears(tiny_llama):
    compress_(tiny_llama, SALRConfig(rank=2, lora_rank=2), show_progress=False)
    unload(tiny_llama)
    assert not any(isinstance(m, SparseLowRankLinear) for m in tiny_llama.modules())


def _linear_pair():
    lin = torch.nn.Linear(64, 48)
    twin = torch.nn.Linear(64, 48)
    twin.load_state_dict(lin.state_dict())
    return lin, twin, lin.weight.detach().clone()


def test_quantized_base_is_q_of_the_pruned_weight():
    from salr_edge.formats.bitmap import bitmap_decode, bitmap_encode, quantize_bitmap

    lin, twin, dense = _linear_pair()
    module = compress_linear(lin, SALRConfig(rank=8, lora_rank=0, values="int4", group_size=16))
    pruned = compress_linear(twin, SALRConfig(rank=8, lora_rank=0)).sparse_weight()
    expected = bitmap_decode(quantize_bitmap(bitmap_encode(pruned, pruned != 0), 4, 16))
    assert module.bits == 4 and module.group_size == 16
    assert torch.equal(module.sparse_weight(), expected)


def test_residual_adapter_is_the_svd_of_what_pruning_and_quantization_removed():
    from salr_edge.algorithms.svd import truncated_svd

    lin, _, dense = _linear_pair()
    module = compress_linear(lin, SALRConfig(rank=8, lora_rank=0, values="int4", group_size=16))
    a, b = truncated_svd(dense - module.sparse_weight(), 8)
    torch.testing.assert_close(module.get_delta_weight(), b @ a, atol=1e-5, rtol=1e-5)


def test_error_aware_adapter_beats_quantizing_after_the_svd():
    """Eckart-Young: the SVD of W - Q is the best rank-r fix of Q; int4's error makes the gap clear (~0.5%)."""
    lin, twin, dense = _linear_pair()
    aware = compress_linear(lin, SALRConfig(rank=8, lora_rank=0, values="int4", group_size=16))
    naive = compress_linear(twin, SALRConfig(rank=8, lora_rank=0))  # SVD of W - prune(W) ...
    naive.quantize_base_(4, 16)  # ... then the base quantized: its error is left to nobody
    assert torch.equal(aware.sparse_weight(), naive.sparse_weight())  # the same Q(prune(W))
    aware_err = (dense - aware.sparse_weight() - aware.get_delta_weight()).norm()
    naive_err = (dense - naive.sparse_weight() - naive.get_delta_weight()).norm()
    assert aware_err < naive_err


def test_tiny_model_with_int8_values_quantizes_every_targeted_layer(tiny_llama):
    compress_(tiny_llama, SALRConfig(rank=4, lora_rank=2, values="int8", group_size=32), show_progress=False)
    layers = dict(iter_sparse_lowrank(tiny_llama))
    assert len(layers) == 14 and all(m.bits == 8 and m.group_size == 32 for m in layers.values())
    assert tiny_llama.salr_metadata["config"]["values"] == "int8"
