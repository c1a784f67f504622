"""Export tiny random Llama and Qwen2 models; ONNX Runtime must compute what PyTorch computes."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch

from salr_edge.export import ExportConfig, UnsupportedArchitectureError, export_onnx
from salr_edge.export import exporter as exporter_module
from salr_edge.export import ops_schema
from salr_edge.export.exporter import _SALRLinearExport
from salr_edge.modules.sparse_lowrank_linear import SparseLowRankLinear, iter_sparse_lowrank
from salr_edge.runtime import generate, make_session

from .conftest import ARCHITECTURES, make_tiny_model
from .helpers import assert_matches_pytorch, half_reference

NODE_NAME = re.compile(r"^/model/layers\.\d+/(self_attn|mlp)/\w+_proj(\+\w+_proj)*/SALRLinear$")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_function_bodies_on_vanilla_ort_match_pytorch(exported, no_library, arch):
    e = exported(arch)
    session = make_session(e.path, use_library=False)
    assert_matches_pytorch(session, e.model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_library_kernels_match_pytorch(exported, salr_lib, arch):
    e = exported(arch)
    session = make_session(e.path, use_library=True)
    assert_matches_pytorch(session, e.model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exported_graph_is_valid_and_named(exported, arch):
    e = exported(arch)
    onnx.checker.check_model(str(e.path), full_check=True)
    model = onnx.load(str(e.path), load_external_data=False)
    assert (e.dir / "model.onnx.data").is_file()
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:7] == ["past_key_values.0.key", "past_key_values.0.value",
                          "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in model.graph.output] == ["logits", "present.0.key", "present.0.value",
                                                    "present.1.key", "present.1.value"]
    dims = [d.dim_param for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"

    salr_nodes = [n for n in model.graph.node if n.domain == ops_schema.SALR_DOMAIN]
    compressed = dict(iter_sparse_lowrank(e.model))
    assert len(compressed) == 14
    # q/k/v and gate/up read one input each: one node per group, the others one node per layer
    assert len(salr_nodes) == 8
    members_seen = []
    for node in salr_nodes:
        assert node.op_type == ops_schema.SALR_LINEAR and NODE_NAME.match(node.name), node.name
        parent, projections = node.name[1:].rsplit("/", 1)[0].replace("/", ".").rsplit(".", 1)
        assert projections in ("q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj")
        members = [compressed[f"{parent}.{p}"] for p in projections.split("+")]
        members_seen += [f"{parent}.{p}" for p in projections.split("+")]
        prefix = f"{parent}.{projections}"
        has_bias = any(m.bias is not None for m in members)
        expected = [f"{prefix}.weight.bitmap", f"{prefix}.weight.values", f"{prefix}.weight.row_offsets",
                    f"{prefix}.A_cat", f"{prefix}.B_cat"] + ([f"{prefix}.bias"] if has_bias else [])
        assert list(node.input[1:]) == expected
        assert node.output[0] == f"{node.name}/output_0"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"in_features": members[0].in_features}
    assert sorted(members_seen) == sorted(compressed)
    has_bias = sum(len(n.input) == 7 for n in salr_nodes)
    assert has_bias == (2 if arch == "qwen2" else 0)  # Qwen2's q/k/v projections carry a bias
    # one model-local function, importing the model's own default opset
    default_opset = {o.domain: o.version for o in model.opset_import}[""]
    assert [(f.domain, f.name) for f in model.functions] == [(ops_schema.SALR_DOMAIN, ops_schema.SALR_LINEAR)]
    assert {o.domain: o.version for o in model.functions[0].opset_import} == {"": default_opset}
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["salr_edge.export_config"])["method"] == "salr"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_reads_the_grouped_kv_cache_without_repeating_it(exported, arch):
    model = onnx.load(str(exported(arch).path), load_external_data=False)
    producer = {out: node for node in model.graph.node for out in node.output}
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2
    for node in attention:
        for name in node.input[1:3]:  # K, V: the concatenated cache, reshaped at most, never expanded
            ops = []
            while name in producer and producer[name].op_type in ("Reshape", "Transpose", "Expand", "Unsqueeze"):
                ops.append(producer[name].op_type)
                name = producer[name].input[0]
            assert "Expand" not in ops, f"{node.name}: K/V repeated to the query heads ({ops})"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_takes_3d_projections_and_appends_the_kv_cache_itself(exported, arch):
    model = onnx.load(str(exported(arch).path), load_external_data=False)
    producer = {out: node for node in model.graph.node for out in node.output}
    outputs = {o.name for o in model.graph.output}
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2
    for i, node in enumerate(attention):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (4, 2)
        assert list(node.input[4:6]) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(node.output[1:3]) == [f"present.{i}.key", f"present.{i}.value"] and set(node.output[1:]) <= outputs
        # q and k reach Attention through RotaryEmbedding only, v straight from its projection: no layout copies
        for name in node.input[:3]:
            assert producer[name].op_type in ("RotaryEmbedding", "Split", "SALRLinear"), producer[name].op_type
    assert not any(n.op_type in ("Transpose", "Concat") and set(n.output) & outputs for n in model.graph.node)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rotary_cos_and_sin_are_computed_once_for_all_layers(exported, arch):
    model = onnx.load(str(exported(arch).path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Cos") == 1 and ops.count("Sin") == 1 and ops.count("RotaryEmbedding") == 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_tied_output_embedding_is_stored_once(exported, arch):
    e = exported(arch)
    model = onnx.load(str(e.path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.op_type)
    if e.model.config.tie_word_embeddings:  # the tiny Llama: Gather and the logits Gemm share one tensor
        assert "lm_head.weight_transposed" not in initializers
        assert sorted(users["lm_head.weight"]) == ["Gather", "Gemm"]
    else:  # the tiny Qwen2: two different matrices
        assert {"lm_head.weight_transposed", "model.embed_tokens.weight"} <= initializers


def test_values_and_adapters_are_stored_as_configured(exported):
    e = exported("llama")
    model = onnx.load(str(e.path), load_external_data=False)
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["model.layers.0.mlp.down_proj.weight.values"] == onnx.TensorProto.FLOAT16
    assert types["model.layers.0.mlp.down_proj.weight.bitmap"] == onnx.TensorProto.UINT8
    assert types["model.layers.0.mlp.down_proj.weight.row_offsets"] == onnx.TensorProto.INT64
    assert types["model.layers.0.mlp.down_proj.A_cat"] == onnx.TensorProto.FLOAT


def test_fp16_adapters_in_an_fp32_model_are_cast_back_in_the_graph(tmp_path):
    from salr_edge.export.exporter import _export_view

    from .conftest import find_library

    model = make_tiny_model("llama")
    config = ExportConfig(adapter_dtype="fp16", genai_config=False)
    out = tmp_path / "model.onnx"
    export_onnx(model, out, config)
    graph = onnx.load(str(out), load_external_data=False).graph
    types = {i.name: i.data_type for i in graph.initializer}
    assert types["model.layers.0.mlp.down_proj.A_cat"] == onnx.TensorProto.FLOAT16
    assert types["model.layers.0.mlp.down_proj.B_cat"] == onnx.TensorProto.FLOAT16
    node = next(n for n in graph.node if n.name == "/model/layers.0/mlp/down_proj/SALRLinear")
    assert node.input[4] == "model.layers.0.mlp.down_proj.A_cat/cast"
    with _export_view(model, config) as target:  # the reference: the same adapters rounded through fp16
        for module in target.modules():
            if isinstance(module, _SALRLinearExport):
                module.A_cat.copy_(module.A_cat.half().float())
                module.B_cat.copy_(module.B_cat.half().float())
        for use_library in (False, True) if find_library() else (False,):
            assert_matches_pytorch(make_session(out, use_library=use_library), target)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_leaves_the_model_untouched(exported, arch):
    e = exported(arch)  # exported earlier in the session (or now)
    fresh = make_tiny_model(arch)
    state, fresh_state = e.model.state_dict(), fresh.state_dict()
    assert state.keys() == fresh_state.keys()
    for key, value in fresh_state.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert [type(m) for m in e.model.modules()] == [type(m) for m in fresh.modules()]
    assert sum(isinstance(m, SparseLowRankLinear) for m in e.model.modules()) == 14
    assert not e.model.training


def test_fp16_export_matches_fp16_pytorch(exported, no_library):
    e = exported("llama", dtype="fp16")
    model = onnx.load(str(e.path), load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert_matches_pytorch(make_session(e.path, use_library=False), half_reference(e.model), dtype="fp16")
    assert next(e.model.parameters()).dtype == torch.float32  # converted a copy, not the caller's model


def test_dense_export_of_a_compressed_model_merges_the_adapters(exported):
    e = exported("qwen2", method="dense")
    model = onnx.load(str(e.path), load_external_data=False)
    assert not any(n.domain == ops_schema.SALR_DOMAIN for n in model.graph.node) and not model.functions
    assert "model.layers.0.mlp.down_proj.weight_transposed" in {i.name for i in model.graph.initializer}
    assert_matches_pytorch(make_session(e.path), e.model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("use_library", [False, True])
def test_greedy_generation_matches_transformers(exported, arch, use_library):
    if use_library:
        from .conftest import find_library

        if find_library() is None:
            pytest.skip("libsalr_ops.so is not built")
    e = exported(arch)
    prompt = torch.tensor([[5, 17, 99, 3, 42, 8]])
    with torch.no_grad():
        expected = e.model.generate(prompt, max_new_tokens=32, do_sample=False)
    got = generate(make_session(e.path, use_library=use_library), input_ids=prompt.numpy(), max_new_tokens=32)
    assert got.shape == (1, 38)
    np.testing.assert_array_equal(got, expected.numpy())


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    session = make_session(exported("llama").path)
    prompt = np.array([[5, 17, 99], [7, 7, 1]])
    a = generate(session, input_ids=prompt, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    b = generate(session, input_ids=prompt, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    np.testing.assert_array_equal(a, b)
    greedy = generate(session, input_ids=prompt, max_new_tokens=8)
    np.testing.assert_array_equal(generate(session, input_ids=prompt, max_new_tokens=8, do_sample=True, top_k=1,
                                           seed=5), greedy)


def test_export_module_forward_equals_the_compressed_layer():
    """The buffers the export node reads compute the original layer (eager path of the stand-in)."""
    model = make_tiny_model("qwen2")
    name, module = next((n, m) for n, m in iter_sparse_lowrank(model) if m.bias is not None)
    stand_in = _SALRLinearExport(module, torch.float16, torch.float32)
    x = torch.randn(2, 3, module.in_features)
    with torch.no_grad():
        torch.testing.assert_close(stand_in(x), module(x), atol=1e-5, rtol=1e-5)
    assert stand_in.A_cat.shape[0] == module.total_rank == 8


def test_salr_method_needs_a_compressed_model(tmp_path):
    with pytest.raises(ValueError, match="no SparseLowRankLinear"):
        export_onnx(make_tiny_model("llama", compress=False), tmp_path / "m.onnx", ExportConfig(method="salr"))
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_is_one_line_naming_the_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError) as info:
        export_onnx(gpt2, tmp_path / "m.onnx", ExportConfig(method="dense"))
    message = str(info.value)
    assert "'gpt2'" in message and "llama" in message and "qwen2" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_missing_output_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(make_tiny_model("llama"), tmp_path / "nope" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_export_leaves_no_file_and_restores_the_model(tmp_path, monkeypatch):
    model = make_tiny_model("llama")

    def boom(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(exporter_module.torch.onnx, "export", boom)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(RuntimeError, match="tracing failed"):
        export_onnx(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert sum(isinstance(m, SparseLowRankLinear) for m in model.modules()) == 14
    assert not any(isinstance(m, _SALRLinearExport) for m in model.modules())


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="int4"), "method must be one of"),
    (dict(dtype="bf16"), "dtype must be one of"),
    (dict(dtype="fp16", values_dtype="fp32"), "needs dtype='fp32'"),
    (dict(opset=17), "opset must be >= 18"),
    (dict(adapter_dtype="int8"), "adapter_dtype must be None or one of"),
    (dict(version=2), "version 2 is not supported"),
    (dict(values="int5"), "values must be None \\(as stored\\) or one of"),
    (dict(values="int4", group_size=0), "group_size must be None or an integer >= 1, got 0"),
    (dict(method="dense", values="int4"), "needs method 'salr': method 'dense' has no quantized path"),
    (dict(group_size=32), "group_size applies only with values 'int8' or 'int4'"),
    (dict(values="float", group_size=32), "group_size applies only with values 'int8' or 'int4'"),
])
def test_export_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(**kwargs)


def test_export_config_round_trips_through_json():
    config = ExportConfig(method="dense", dtype="fp16", opset=19, function_fallback=False)
    assert ExportConfig.from_json(config.to_json()) == config
    quantized = ExportConfig(values="int4", group_size=64)
    assert ExportConfig.from_json(quantized.to_json()) == quantized
