"""Feeds and PyTorch references shared by the exporter tests."""

from __future__ import annotations

import copy

import numpy as np
import torch

# |ORT - PyTorch| allowed on logits, per export dtype:
# - fp32: both compute the same function in fp32 (the fixtures make fp16 `values` exact); only the
#   summation order differs: ~1e-7 measured, 1e-4 asked for by the exporter's contract.
# - fp16: every op rounds to fp16 (half an ulp at |logit| ~ 0.5 is 1.2e-4) and ORT's CPU computes
#   fp16 ops in fp32 behind inserted casts while PyTorch rounds at different points; ~7e-4 measured
#   over two layers, 5e-3 leaves room without hiding a wrong weight (those miss by O(0.1)).
LOGITS_ATOL = {"fp32": 1e-4, "fp16": 5e-3}

SHAPES = [(1, 5, 0), (2, 3, 4), (2, 1, 7)]  # (batch, new tokens, past length)


def half_reference(model):
    """The fp16 PyTorch model the fp16 export should equal (rotary frequencies stay fp32, as exported)."""
    ref = copy.deepcopy(model).half()
    originals = dict(model.named_buffers())
    for name, buf in ref.named_buffers():
        if name.endswith("inv_freq"):
            buf.data = originals[name].float().clone()
    return ref


def reference_and_feeds(model, batch: int, seq: int, past: int, seed: int = 0):
    """(logits [B, seq, V], present list, ORT feeds) for `seq` new tokens after `past` cached ones."""
    config = model.config
    gen = torch.Generator().manual_seed(seed + 31 * past + seq)
    ids = torch.randint(0, config.vocab_size, (batch, past + seq), generator=gen)
    with torch.no_grad():
        full = model(ids, use_cache=True)
        logits = full.logits[:, past:]
        present = [t for layer in full.past_key_values.layers for t in (layer.keys, layer.values)]
        prefix = model(ids[:, :past], use_cache=True).past_key_values if past else None
    np_dtype = np.float16 if next(model.parameters()).dtype == torch.float16 else np.float32
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    feeds = {
        "input_ids": ids[:, past:].numpy(),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
    }
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            if prefix is None:
                value = np.zeros((batch, heads, 0, head_dim), dtype=np_dtype)
            else:
                value = getattr(prefix.layers[i], kind + "s").numpy()
            feeds[f"past_key_values.{i}.{kind}"] = value
    return logits.float().numpy(), [p.float().numpy() for p in present], feeds


def assert_matches_pytorch(session, model, dtype: str = "fp32") -> None:
    """Logits and present of `session` equal the PyTorch model's for every shape in SHAPES."""
    for batch, seq, past in SHAPES:
        logits, present, feeds = reference_and_feeds(model, batch, seq, past)
        outputs = session.run(None, feeds)
        assert outputs[0].shape == logits.shape
        err = np.abs(outputs[0].astype(np.float32) - logits).max()
        assert err <= LOGITS_ATOL[dtype], f"batch {batch}, seq {seq}, past {past}: max |dlogits| = {err:.3g}"
        for got, want in zip(outputs[1:], present, strict=True):
            assert got.shape == want.shape  # (B, kv_heads, past + seq, head_dim)
            np.testing.assert_allclose(got.astype(np.float32), want, atol=LOGITS_ATOL[dtype], rtol=0)
