"""Model-quality checks on the built-in SmolLM2-135M (marker `slow`; CI runs them in this small form)."""

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikitext-2" / "test.txt"


@pytest.fixture(scope="module")
def default_model():
    from salr_edge.models import load_model

    return load_model(None)


@pytest.mark.parametrize("layer", ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj"])
def test_svd_residual_beats_the_energy_bound_on_real_layers(default_model, layer):
    from salr_edge.algorithms.masks import magnitude_scores, select_mask
    from salr_edge.algorithms.svd import truncated_svd

    w = default_model[0].get_submodule(layer).weight.detach()
    residual = w * ~select_mask(magnitude_scores(w), 0.5)
    for rank in (16, 64):
        a, b = truncated_svd(residual, rank)
        ratio = float((residual - b @ a).pow(2).sum() / residual.pow(2).sum())
        assert ratio <= 1 - rank / min(w.shape)


@pytest.mark.skipif(not DATA.is_file(), reason="../shared/data is not beside the project")
def test_svd_residual_recovers_perplexity_of_the_pruned_default_model(default_model):
    import copy

    from salr_edge.api import compress_
    from salr_edge.config import SALRConfig
    from salr_edge.data import load_token_stream
    from salr_edge.evaluation import perplexity

    model, tokenizer = default_model
    tokens = load_token_stream(DATA, tokenizer, max_chars=40_000)
    dense = perplexity(model, tokens, 512, max_windows=2, show_progress=False)
    pruned = copy.deepcopy(model)
    first_layers = r"model\.layers\.[0-5]\..*_proj"  # a small form: CI's 2 cores
    compress_(pruned, SALRConfig(sparsity=0.5, rank=0, lora_rank=0, target_modules=first_layers), show_progress=False)
    recovered = copy.deepcopy(model)
    compress_(recovered, SALRConfig(sparsity=0.5, rank=64, lora_rank=0, target_modules=first_layers),
              show_progress=False)
    ppl_pruned = perplexity(pruned, tokens, 512, max_windows=2, show_progress=False)
    ppl_recovered = perplexity(recovered, tokens, 512, max_windows=2, show_progress=False)
    assert math.isfinite(dense) and dense < 60
    assert dense < ppl_recovered < ppl_pruned
