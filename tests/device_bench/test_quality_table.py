from salr_edge.api import compress_
from salr_edge.config import SALRConfig
from salr_edge.device_bench.quality_table import layer_bytes
from salr_edge.modules.sparse_lowrank_linear import iter_sparse_lowrank


def test_layer_bytes_count_the_stored_integers_and_scales_of_quantized_layers(tiny_llama):
    compress_(tiny_llama, SALRConfig(rank=4, lora_rank=2, values="int4", group_size=16), show_progress=False)
    comp, dense = layer_bytes(tiny_llama)
    layers = [m for _, m in iter_sparse_lowrank(tiny_llama)]
    expected = sum(m.to_bitmap().nbytes() + 2 * m.total_rank * (m.in_features + m.out_features) for m in layers)
    assert comp == expected
    assert dense == sum(2 * m.in_features * m.out_features for m in layers)
