"""Post-export graph passes on hand-made graphs: naming helpers and the weight-transpose resolution."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from salr_edge.export.exporter import _path_segments, _resolve_weight_transposes

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("fqn,segments", [
    ("model.layers.3.mlp.down_proj", ["model", "layers.3", "mlp", "down_proj"]),
    ("model.layers.12.self_attn.q_proj", ["model", "layers.12", "self_attn", "q_proj"]),
    ("lm_head", ["lm_head"]),
    ("", []),
])
def test_path_segments_keep_layer_indices_with_their_list(fqn, segments):
    assert _path_segments(fqn) == segments


def _graph():
    """Embedding E shared by Gather and MatMul(h, Transpose(E)); an untied MatMul(h, Transpose(U));
    and MatMul(h, C) where C is a pre-folded copy of Sᵀ (S also an initializer, used by a Gather)."""
    rng = np.random.default_rng(0)
    e = rng.standard_normal((11, 6)).astype(np.float32)  # (V, D)
    u = rng.standard_normal((5, 6)).astype(np.float32)  # (N, D)
    s = rng.standard_normal((7, 6)).astype(np.float32)  # (N2, D)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"]),  # (B, T, D)
        helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "E_t"], ["logits"]),
        helper.make_node("Transpose", ["U"], ["U_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "U_t"], ["proj"]),
        helper.make_node("Gather", ["S", "ids"], ["hs"]),
        helper.make_node("MatMul", ["hs", "C"], ["proj2"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", 11]),
         helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["B", "T", 5]),
         helper.make_tensor_value_info("proj2", TensorProto.FLOAT, ["B", "T", 7])],
        [numpy_helper.from_array(e, "E"), numpy_helper.from_array(u, "U"), numpy_helper.from_array(s, "S"),
         numpy_helper.from_array(np.ascontiguousarray(s.T), "C")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto):
    ids = np.array([[1, 4, 6], [0, 5, 3]], dtype=np.int64)  # < 7 rows of S
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})


def test_transposes_are_shared_or_folded_and_results_unchanged():
    proto = _graph()
    expected = _run(proto)
    model = ir.serde.deserialize_model(proto)
    shared, folded = _resolve_weight_transposes(model)
    assert (shared, folded) == (2, 1)  # E (tied to a Gather) and S (pre-folded copy C) shared; U folded
    result = ir.serde.serialize_model(model)
    onnx.checker.check_model(result, full_check=True)
    initializers = {i.name: tuple(i.dims) for i in result.graph.initializer}
    assert initializers == {"E": (11, 6), "U_transposed": (6, 5), "S": (7, 6)}  # no copy of E or S left
    op_types = [n.op_type for n in result.graph.node]
    assert "Transpose" not in op_types and op_types.count("Gemm") == 2 and op_types.count("MatMul") == 1
    for got, want in zip(_run(result), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
