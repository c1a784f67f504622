"""Shared fixtures: tiny random-weight models (no hub access) and a fixed seed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_tiny_llama(tie: bool = True, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def randomize_lora(model) -> None:
    """Give every LoRA B a non-zero value so the adapter path is exercised (B = 0 proves nothing)."""
    from salr_edge.modules.sparse_lowrank_linear import iter_sparse_lowrank

    with torch.no_grad():
        for _, module in iter_sparse_lowrank(model):
            for name in module.adapter_names:
                if name == "lora":
                    module.salr_B[name].normal_(0, 0.05)
