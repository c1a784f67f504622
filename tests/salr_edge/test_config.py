import pytest

from salr_edge.config import SALRConfig, parse_granularity


def test_json_round_trip():
    cfg = SALRConfig(sparsity=0.7, rank=8, target_modules=["q_proj", "v_proj"], exclude_modules="lm_head")
    assert SALRConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(sparsity=-0.1), "sparsity must be in"),
    (dict(rank=-1), "rank must be"),
    (dict(pruning="random"), "pruning must be"),
    (dict(granularity="4:2"), "granularity"),
    (dict(granularity="2:4", sparsity=0.7), "fixes sparsity"),
    (dict(target_modules=None), "target_modules"),
    (dict(version=2), "version 2"),
    (dict(values="int5"), "values must be one of"),
    (dict(values="fp16"), "values must be one of"),
    (dict(group_size=0), "group_size must be an integer >= 1, got 0"),
    (dict(group_size=32.0), "group_size must be an integer"),
    (dict(group_size=True), "group_size must be an integer"),
])
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SALRConfig(**kwargs)


def test_quantized_values_round_trip_through_json():
    cfg = SALRConfig(values="int4", group_size=64)
    assert SALRConfig.from_json(cfg.to_json()) == cfg and cfg.bits == 4


def test_config_saved_before_quantized_values_loads_as_float():
    old = SALRConfig().to_dict()
    del old["values"], old["group_size"]  # a salr_config.json written before the fields existed
    cfg = SALRConfig.from_dict(old)
    assert cfg.values == "float" and cfg.bits is None


def test_unknown_field_in_dict_is_rejected():
    with pytest.raises(ValueError, match="unknown SALRConfig fields"):
        SALRConfig.from_dict({"sparsity": 0.5, "bogus": 1})


def test_parse_granularity():
    assert parse_granularity("2:4") == ("nm", 2, 4)
    assert parse_granularity("row") == ("row", 0, 0)
