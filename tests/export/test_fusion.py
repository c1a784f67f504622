"""The graph pass that fuses `SALRLinear(Q)` nodes reading one input (export/fusion.py), on hand-made graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from salr_edge.export import ops_schema
from salr_edge.export.fusion import fuse_shared_input_linears
from salr_edge.formats.bitmap import bitmap_encode, quantize_bitmap

ort = pytest.importorskip("onnxruntime")

K = 128


def _layer(rng, name: str, n: int, rank: int, bits: int | None, group: int, two_four: bool, bias: bool):
    """(initializers, input names) of one compressed layer `name` with n outputs."""
    w = torch.from_numpy(rng.standard_normal((n, K)).astype(np.float32))
    if two_four:
        keep = w.abs().reshape(n, K // 4, 4).argsort(dim=-1, descending=True)[..., :2]
        mask = torch.zeros(n, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, K)
    else:
        mask = torch.from_numpy(rng.random((n, K)) < 0.45)
    t = bitmap_encode(w, mask, values_dtype=torch.float16)
    if bits is not None:
        t = quantize_bitmap(t, bits, group)
    arrays = {"weight.bitmap": t.bitmap.numpy(), "weight.values": t.values.numpy(),
              "weight.row_offsets": t.row_offsets.numpy()}
    if bits is not None:
        arrays["weight.scales"] = t.scales.numpy()
    arrays["A_cat"] = (0.1 * rng.standard_normal((rank, K))).astype(np.float32)
    arrays["B_cat"] = (0.1 * rng.standard_normal((n, rank))).astype(np.float32)
    if bias:
        arrays["bias"] = rng.standard_normal(n).astype(np.float32)
    inits = [numpy_helper.from_array(a, f"{name}.{role}") for role, a in arrays.items()]
    return inits, [i.name for i in inits]


def _model(layers: list[dict], bits: int | None = 4, group: int = 32, two_four: bool = True,
           shared_offsets: bool = False, adapter_dtype=None) -> onnx.ModelProto:
    """One input X [B, T, K]; each layer dict: name, n, rank, input ("x" or "x2"), bias. Outputs: each layer's Y."""
    rng = np.random.default_rng(0)
    op = ops_schema.SALR_LINEAR_Q if bits is not None else ops_schema.SALR_LINEAR
    attrs = {"in_features": K} | ({"bits": bits, "group_size": group} if bits is not None else {})
    nodes = [helper.make_node("Relu", ["x"], ["x2"])]
    inits, outputs = [], []
    for layer in layers:
        layer_inits, names = _layer(rng, layer["name"], layer["n"], layer["rank"], bits, group,
                                    layer.get("two_four", two_four), layer.get("bias", False))
        if shared_offsets and inits:  # the exporter stores equal constants once
            same = [i for i in inits if i.name.endswith("row_offsets")
                    and numpy_helper.to_array(i).shape == numpy_helper.to_array(layer_inits[2]).shape
                    and (numpy_helper.to_array(i) == numpy_helper.to_array(layer_inits[2])).all()]
            if same:
                names[2] = same[0].name
                layer_inits = [i for i in layer_inits if i.name != layer_inits[2].name]
        if adapter_dtype is not None:  # stored narrow, a Cast to fp32 in the graph (exporter._narrow_adapters)
            first_adapter = len(names) - 2 - int(layer.get("bias", False))
            for position in (first_adapter, first_adapter + 1):
                index = next(i for i, t in enumerate(layer_inits) if t.name == names[position])
                narrow = numpy_helper.from_array(numpy_helper.to_array(layer_inits[index]).astype(adapter_dtype),
                                                 names[position])
                layer_inits[index] = narrow
                nodes.append(helper.make_node("Cast", [names[position]], [names[position] + "/cast"],
                                              to=TensorProto.FLOAT))
                names[position] += "/cast"
        inits += layer_inits
        out = f"{layer['name']}.y"
        nodes.append(helper.make_node(op, [layer.get("input", "x"), *names], [out], domain=ops_schema.SALR_DOMAIN,
                                      name=f"/{layer['name'].replace('.', '/')}/{op}", **attrs))
        nodes.append(helper.make_node("Identity", [out], [f"{layer['name']}.out"]))
        outputs.append(helper.make_tensor_value_info(f"{layer['name']}.out", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
                              outputs, inits)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid(ops_schema.SALR_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.functions.extend(ops_schema.function_protos(23, [op]))
    return model


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[int, int]]:
    ir_model = ir.serde.deserialize_model(model)
    counts = fuse_shared_input_linears(ir_model)
    return ir.serde.serialize_model(ir_model), counts


def _run(model: onnx.ModelProto, library: str | None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if library is not None:
        so.register_custom_ops_library(library)
    else:
        so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    return session.run(None, {"x": x})


def _salr_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == ops_schema.SALR_DOMAIN]


QKV = [dict(name="l0.attn.q_proj", n=64, rank=3, bias=True), dict(name="l0.attn.k_proj", n=32, rank=5),
       dict(name="l0.attn.v_proj", n=32, rank=2, bias=True)]


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_layers_reading_one_input_become_one_node_with_the_same_outputs(salr_lib, bits):
    model = _model(QKV, bits=bits)
    fused, counts = _fused(model)
    assert counts == (3, 1)
    nodes = _salr_nodes(fused)
    assert [n.name for n in nodes] == [f"/l0/attn/q_proj+k_proj+v_proj/{nodes[0].op_type}"]
    assert next(n for n in fused.graph.node if n.op_type == "Split").input[0] == nodes[0].output[0]
    for library in (salr_lib, None):
        for got, want in zip(_run(fused, library), _run(model, library), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_adapters_are_stacked_and_b_is_padded_in_the_graph_not_on_disk():
    model = _model(QKV, bits=4)
    fused, _ = _fused(model)
    arrays = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    prefix = "l0.attn.q_proj+k_proj+v_proj"
    np.testing.assert_array_equal(arrays[f"{prefix}.A_cat"],
                                  np.concatenate([original[f"{layer['name']}.A_cat"] for layer in QKV]))
    # each member's B is stored as it was; the block-diagonal B is a Pad + Concat that ORT folds at load
    for layer in QKV:
        np.testing.assert_array_equal(arrays[f"{layer['name']}.B_cat"], original[f"{layer['name']}.B_cat"])
    assert sum(a.nbytes for n, a in arrays.items() if n.endswith("B_cat")) == \
        sum(a.nbytes for n, a in original.items() if n.endswith("B_cat"))
    assert [n.op_type for n in fused.graph.node][:5] == ["Relu", "Pad", "Pad", "Pad", "Concat"]
    # a member without a bias reads zeros
    np.testing.assert_array_equal(arrays[f"{prefix}.bias"][64:96], 0)
    offsets = arrays[f"{prefix}.weight.row_offsets"]
    assert offsets.shape == (129,) and offsets[64] == original["l0.attn.q_proj.weight.row_offsets"][-1]
    assert not any(name.startswith("l0.attn.q_proj.weight") for name in arrays)  # the members' weights are gone


def test_adapters_stored_narrower_keep_their_cast(salr_lib):
    model = _model(QKV, bits=4, adapter_dtype=np.float16)
    fused, counts = _fused(model)
    assert counts == (3, 1)
    casts = [n for n in fused.graph.node if n.op_type == "Cast"]
    # A of the fused node and each member's B, padded after the Cast (ORT's CPU Pad has no fp16 kernel, and
    # a node ORT cannot run is not folded at load); the members' own casts are gone
    assert len(casts) == 4
    assert all(n.input[0].endswith("/cast") for n in fused.graph.node if n.op_type == "Pad")
    arrays = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    assert arrays["l0.attn.q_proj+k_proj+v_proj.A_cat"].dtype == np.float16
    for library in (salr_lib, None):
        for got, want in zip(_run(fused, library), _run(model, library), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shared_row_offsets_are_read_not_moved(salr_lib):
    layers = [dict(name="l0.mlp.gate_proj", n=96, rank=2), dict(name="l0.mlp.up_proj", n=96, rank=2),
              dict(name="l1.mlp.gate_proj", n=96, rank=2, input="x2")]
    model = _model(layers, bits=4, shared_offsets=True)
    fused, counts = _fused(model)
    assert counts == (2, 1)
    names = {i.name for i in fused.graph.initializer}
    assert "l0.mlp.gate_proj.weight.row_offsets" in names  # still read by the unfused layer of l1
    for got, want in zip(_run(fused, salr_lib), _run(model, salr_lib), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layers_whose_values_straddle_scale_groups_are_fused_only_as_the_last_member(salr_lib):
    # unstructured masks: nnz of a layer is rarely a multiple of the group, so its scales would straddle
    model = _model(QKV, bits=4, group=32, two_four=False)
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    aligned = [layer["name"] for layer in QKV
               if original[f"{layer['name']}.weight.row_offsets"][-1] % 32 == 0]
    assert len(aligned) < 2  # the random masks leave at least two unaligned layers
    fused, counts = _fused(model)
    assert counts == ((len(aligned) + 1, 1) if aligned else (0, 0))
    assert len(_salr_nodes(fused)) == 3 - len(aligned)
    for got, want in zip(_run(fused, salr_lib), _run(model, salr_lib), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layers_on_different_inputs_or_of_different_kinds_stay_apart():
    layers = [dict(name="l0.a", n=32, rank=2), dict(name="l0.b", n=32, rank=2, input="x2")]
    fused, counts = _fused(_model(layers, bits=8))
    assert counts == (0, 0) and len(_salr_nodes(fused)) == 2
