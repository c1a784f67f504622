"""Export of quantized bases (bitmap format v2): `com.salr::SALRLinearQ` nodes that vanilla ORT computes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from salr_edge.export import ExportConfig, export_onnx, ops_schema
from salr_edge.export.exporter import _export_view, _SALRLinearExport
from salr_edge.modules.sparse_lowrank_linear import iter_sparse_lowrank
from salr_edge.runtime import make_session

from .conftest import make_tiny_model
from .helpers import assert_matches_pytorch, half_reference

# (arch, values, granularity, group_size): both bit widths, unstructured and 2:4 masks, groups that span
# rows (64 > K/2 of every tiny layer) and groups that fit them; Qwen2 adds the bias input.
CASES = [("llama", "int4", "matrix", 32), ("qwen2", "int4", "2:4", 16),
         ("llama", "int8", "2:4", 32), ("qwen2", "int8", "matrix", 64)]
INT_DTYPES = {"int4": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}

_CACHE: dict[tuple, tuple] = {}


@pytest.fixture(scope="module")
def quantized_export(tmp_path_factory):
    """quantized_export(case, dtype="fp32") -> (PyTorch model, .onnx path), exported once per module."""

    def get(case: tuple, dtype: str = "fp32"):
        key = (*case, dtype)
        if key not in _CACHE:
            arch, values, granularity, group_size = case
            model = make_tiny_model(arch, values=values, granularity=granularity, group_size=group_size)
            out = tmp_path_factory.mktemp(f"{arch}_{values}_{dtype}") / "model.onnx"
            export_onnx(model, out, ExportConfig(dtype=dtype, genai_config=False))
            _CACHE[key] = (model, out)
        return _CACHE[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_function_body_on_vanilla_ort_matches_pytorch(quantized_export, no_library, case):
    model, path = quantized_export(case)
    assert_matches_pytorch(make_session(path, use_library=False), model)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_quantized_layers_lower_to_salr_linear_q(quantized_export, case):
    from onnx import numpy_helper

    arch, values, _, group_size = case
    model, path = quantized_export(case)
    proto = onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    types = {i.name: i.data_type for i in proto.graph.initializer}
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    layers = dict(iter_sparse_lowrank(model))
    nodes = [n for n in proto.graph.node if n.domain == ops_schema.SALR_DOMAIN]
    seen = []
    for node in nodes:
        assert node.op_type == ops_schema.SALR_LINEAR_Q
        parent, projections = node.name[1:].rsplit("/", 1)[0].replace("/", ".").rsplit(".", 1)
        names = [f"{parent}.{p}" for p in projections.split("+")]
        seen += names
        stored = [layers[n].to_bitmap() for n in names]
        prefix = f"{parent}.{projections}"
        has_bias = any(layers[n].bias is not None for n in names)
        expected = [f"{prefix}.weight.bitmap", f"{prefix}.weight.values", f"{prefix}.weight.row_offsets",
                    f"{prefix}.weight.scales", f"{prefix}.A_cat", f"{prefix}.B_cat"]
        inputs = list(node.input[1:])
        # Equal constants are stored once: 2:4 layers of one shape share their row offsets.
        inputs[2] = expected[2]
        assert inputs == expected + ([f"{prefix}.bias"] if has_bias else [])
        nnz = [int(t.row_offsets[-1]) for t in stored]
        offsets = np.concatenate([[0]] + [t.row_offsets[1:].numpy() + sum(nnz[:i]) for i, t in enumerate(stored)])
        assert (arrays[node.input[3]] == offsets).all()
        assert (arrays[node.input[1]] == np.concatenate([t.bitmap.numpy() for t in stored])).all()
        assert (arrays[node.input[2]] == np.concatenate([t.values.numpy() for t in stored])).all()
        assert (arrays[node.input[4]] == np.concatenate([t.scales.numpy() for t in stored])).all()
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"in_features": layers[names[0]].in_features, "bits": layers[names[0]].bits,
                         "group_size": group_size}
        assert types[f"{prefix}.weight.values"] == INT_DTYPES[values]
        assert types[f"{prefix}.weight.scales"] == onnx.TensorProto.FLOAT16
    assert sorted(seen) == sorted(layers) and len(layers) == 14
    # every q/k/v and gate/up group is fused when the members' values fill whole scale groups and bytes
    aligned = all(int(layers[n].to_bitmap().row_offsets[-1]) % group_size == 0 for n in layers)
    assert len(nodes) == 8 if aligned else 8 <= len(nodes) < 14
    assert sum(len(n.input) == 8 for n in nodes) == (2 if arch == "qwen2" else 0)
    assert [(f.domain, f.name) for f in proto.functions] == [(ops_schema.SALR_DOMAIN, ops_schema.SALR_LINEAR_Q)]


def test_initializers_hold_the_modules_stored_integers_and_scales(quantized_export):
    from onnx import numpy_helper

    model, path = quantized_export(CASES[0])
    proto = onnx.load(str(path))
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    stored = module.to_bitmap()
    prefix = "model.layers.1.mlp.down_proj.weight"
    assert (arrays[f"{prefix}.values"] == stored.values.numpy()).all()
    assert (arrays[f"{prefix}.scales"] == stored.scales.numpy()).all()


def test_fp16_quantized_export_matches_fp16_pytorch(quantized_export, no_library):
    model, path = quantized_export(CASES[0], dtype="fp16")
    assert_matches_pytorch(make_session(path, use_library=False), half_reference(model), dtype="fp16")


def test_float_model_is_quantized_at_export_with_fp16_adapters(tmp_path, no_library):
    model = make_tiny_model("llama")
    config = ExportConfig(values="int8", group_size=16, adapter_dtype="fp16", genai_config=False)
    out = tmp_path / "model.onnx"
    export_onnx(model, out, config)
    graph = onnx.load(str(out), load_external_data=False).graph
    node = next(n for n in graph.node if n.name == "/model/layers.0/mlp/down_proj/SALRLinearQ")
    assert node.input[5] == "model.layers.0.mlp.down_proj.A_cat/cast"  # A_cat narrowed, cast back
    assert all(m.is_quantized is False for _, m in iter_sparse_lowrank(model))  # the caller's model untouched
    expected = {name: copy.deepcopy(m).quantize_base_(8, 16).to_bitmap() for name, m in iter_sparse_lowrank(model)}
    with _export_view(model, config) as target:  # the reference: the stand-ins, adapters rounded through fp16
        for name, module in target.named_modules():
            if isinstance(module, _SALRLinearExport):
                assert torch.equal(module.weight.values, expected[name].values)
                assert torch.equal(module.weight.scales, expected[name].scales)
                module.A_cat.copy_(module.A_cat.half().float())
                module.B_cat.copy_(module.B_cat.half().float())
        assert_matches_pytorch(make_session(out, use_library=False), target)


@pytest.mark.parametrize("config, message", [
    (ExportConfig(values="int8"), "stores int4 values \\(group_size 32\\), not the values='int8'"),
    (ExportConfig(values="int4", group_size=16), "never quantized again"),
    (ExportConfig(values="float"), "values='float' would need them dequantized"),
])
def test_quantized_layers_are_never_requantized_at_export(config, message, tmp_path):
    model = make_tiny_model("llama", values="int4", group_size=32)
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "m.onnx", config)
    assert list(tmp_path.iterdir()) == []
