import pytest

from salr_edge.targeting import find_target_linears


def test_all_linear_excludes_the_output_head(tiny_llama):
    names = find_target_linears(tiny_llama, "all-linear")
    assert "lm_head" not in names and len(names) == 14


def test_list_matches_exact_names_and_suffixes(tiny_llama):
    names = find_target_linears(tiny_llama, ["q_proj", "model.layers.1.mlp.down_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj"]


def test_string_is_a_full_regex_match(tiny_llama):
    assert find_target_linears(tiny_llama, r".*\.0\..*_proj") == [
        f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    with pytest.raises(ValueError):
        find_target_linears(tiny_llama, "q_proj")  # a full match, not a search


def test_exclude_uses_the_same_rules(tiny_llama):
    names = find_target_linears(tiny_llama, "all-linear", exclude_modules=["mlp.down_proj", "k_proj"])
    assert len(names) == 10 and not any(n.endswith(("down_proj", "k_proj")) for n in names)


def test_empty_match_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        find_target_linears(tiny_llama, ["attn.c_attn"])
