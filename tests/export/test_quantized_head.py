"""The quantized output head (`ExportConfig(lm_head="int8" | "int4")`): encoding, a tied table stored once, ORT vs
PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from salr_edge.export.exporter import ExportConfig, _export_view, export_onnx
from salr_edge.export.quantized_head import dequantize_blocks, quantize_blocks, quantized_head_replacements
from salr_edge.runtime import make_session

from .conftest import make_tiny_model
from .helpers import SHAPES, reference_and_feeds

# MatMulNBits at accuracy level 4 quantizes the activations to int8 per block of 32: ~0.3% of the largest
# logit measured on the tiny models; a wrong scale or a misplaced block misses by tens of percent.
RELATIVE_TOL = 0.02


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [64, 45, 7])
def test_blocks_round_trip_within_half_a_step(k, bits):
    torch.manual_seed(0)
    w = torch.randn(12, k)
    w[3] = 0.0  # an all-zero row: its blocks get scale 1 and q = the zero point
    q, scales = quantize_blocks(w, bits=bits)
    assert q.dtype == torch.uint8 and q.shape == (12, -(-k // 32), 32 * bits // 8)
    back = dequantize_blocks(q, scales, k, torch.float32, bits)
    assert back.shape == w.shape
    step = scales.repeat_interleave(32, dim=1)[:, :k]
    assert torch.all((back - w).abs() <= step / 2 + 1e-7)
    assert torch.equal(back[3], torch.zeros(k))


def test_int4_codes_pack_low_nibble_first():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 31] = 7.0, -7.0, 1.0  # scale 1: codes 15, 1, ..., 9 (zero point 8)
    q, scales = quantize_blocks(w, bits=4)
    assert scales.item() == 1.0
    assert q[0, 0, 0].item() == 15 | 1 << 4 and q[0, 0, 15].item() == 8 | 9 << 4
    assert torch.all(q[0, 0, 1:15] == 8 | 8 << 4)


def _export(tmp_path, arch, lm_head="int8"):
    model = make_tiny_model(arch)
    out = tmp_path / f"{arch}.onnx"
    config = ExportConfig(lm_head=lm_head, genai_config=False)
    export_onnx(model, out, config)
    return model, config, out


def _check_logits(session, model, config):
    with _export_view(model, config) as target:
        for batch, seq, past in SHAPES:
            logits, _, feeds = reference_and_feeds(target, batch, seq, past)
            got = session.run(None, feeds)[0]
            assert np.abs(got - logits).max() <= RELATIVE_TOL * np.abs(logits).max()


@pytest.mark.parametrize("lm_head", ["int8", "int4"])
def test_tied_embedding_reads_the_heads_quantized_table(tmp_path, lm_head):
    model, config, out = _export(tmp_path, "llama", lm_head)
    graph = onnx.load(str(out), load_external_data=False).graph
    names = {init.name: init for init in graph.initializer}
    assert "lm_head.weight.q" in names and names["lm_head.weight.q"].data_type == onnx.TensorProto.UINT8
    assert not any("embed_tokens" in name for name in names), "the tied table is stored twice"
    assert [n.op_type for n in graph.node if n.domain == "com.microsoft"] == ["MatMulNBits"]
    _check_logits(make_session(out), model, config)


def test_untied_embedding_stays_float(tmp_path):
    model, config, out = _export(tmp_path, "qwen2")
    names = {init.name for init in onnx.load(str(out), load_external_data=False).graph.initializer}
    assert "model.embed_tokens.weight" in names and "lm_head.weight.q" in names
    _check_logits(make_session(out), model, config)


def test_head_with_bias_is_refused():
    model = make_tiny_model("llama", compress=False)
    model.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        quantized_head_replacements(model, torch.float32, "int4")


def test_unknown_lm_head_mode_is_refused():
    with pytest.raises(ValueError, match="lm_head must be one of"):
        ExportConfig(lm_head="int2")
