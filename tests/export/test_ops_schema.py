"""The com.salr schemas and function bodies: names match the C++ header, bodies compute the op contracts."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from salr_edge.export import ops_schema
from tests.custom_ops import reference

from .conftest import REPO

ort = pytest.importorskip("onnxruntime")

# |ORT - float64 reference| allowed, per output dtype. fp32: the body decodes exactly (values are fp16
# or fp32 numbers, cast losslessly) and Gemm accumulates K <= 40 products of O(1) terms in fp32
# (~K * 6e-8); 1e-5 leaves margin. fp16: one rounding of O(5)-sized outputs is 2^-11 * 8 ~ 4e-3, and
# intermediate fp16 roundings (X2·Aᵀ) add about as much again.
TOLERANCES = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-2}


def test_constants_match_the_cpp_header():
    text = (REPO / "custom_ops" / "include" / "salr_ops.h").read_text()
    consts = dict(re.findall(r'inline constexpr char (k\w+)\[\] = "([^"]*)";', text))
    consts.update(re.findall(r"inline constexpr int (k\w+) = (\d+);", text))
    assert consts["kDomain"] == ops_schema.SALR_DOMAIN == "com.salr"
    assert int(consts["kOpsetVersion"]) == ops_schema.SALR_OPSET_VERSION
    assert (consts["kBitmapDecodeOp"], consts["kFusedAdapterGemmOp"], consts["kSALRLinearOp"],
            consts["kSALRLinearQOp"]) == ops_schema.OP_TYPES
    assert consts["kInFeaturesAttr"] == ops_schema.IN_FEATURES_ATTR
    assert (consts["kBitsAttr"], consts["kGroupSizeAttr"]) == (ops_schema.BITS_ATTR, ops_schema.GROUP_SIZE_ATTR)
    assert ops_schema.SALR_DOMAIN == reference.SALR_DOMAIN


def test_register_schemas_is_idempotent():
    ops_schema.register_schemas()
    ops_schema.register_schemas()
    for op in ops_schema.OP_TYPES:
        schema = onnx.defs.get_schema(op, ops_schema.SALR_OPSET_VERSION, ops_schema.SALR_DOMAIN)
        assert schema.domain == ops_schema.SALR_DOMAIN and schema.since_version == 1
    linear = onnx.defs.get_schema(ops_schema.SALR_LINEAR, 1, ops_schema.SALR_DOMAIN)
    assert [p.name for p in linear.inputs] == ["X", "bitmap", "values", "row_offsets", "A_cat", "B_cat", "bias"]
    assert linear.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Optional


def test_quantized_linear_schema_takes_scales_and_bits_and_group_size():
    ops_schema.register_schemas()
    schema = onnx.defs.get_schema(ops_schema.SALR_LINEAR_Q, 1, ops_schema.SALR_DOMAIN)
    assert [p.name for p in schema.inputs] == ["X", "bitmap", "values", "row_offsets", "scales", "A_cat", "B_cat",
                                               "bias"]
    assert schema.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Optional
    assert set(schema.attributes) == {"in_features", "bits", "group_size"}
    assert all(a.required for a in schema.attributes.values())
    values_types = next(c for c in schema.type_constraints if c.type_param_str == "Q").allowed_type_strs
    assert sorted(values_types) == ["tensor(int8)", "tensor(uint8)"]


def _all_nodes(nodes):
    """`nodes` and the nodes of their subgraphs (If branches), recursively."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g.node)


def test_function_bodies_use_only_standard_ops_and_the_requested_opset():
    functions = ops_schema.function_protos(19)
    assert [f.name for f in functions] == list(ops_schema.OP_TYPES)
    for function in functions:
        assert {node.domain for node in _all_nodes(function.node)} == {""}
        assert [(o.domain, o.version) for o in function.opset_import] == [("", 19)]
    with pytest.raises(ValueError, match=">= 18"):
        ops_schema.function_protos(17)


def _weight(rng, n, k, density, empty_row=True):
    w = rng.standard_normal((n, k)).astype(np.float32)
    mask = rng.random((n, k)) < density
    if empty_row and n > 1:
        mask[1] = False  # a row with no kept entry
    return w, mask


def _model(op, inputs, inits, x_type, out_rank, in_features=None, opset=20, out_type=None):
    attrs = {} if in_features is None else {ops_schema.IN_FEATURES_ATTR: in_features}
    node = helper.make_node(op, inputs, ["Y"], domain=ops_schema.SALR_DOMAIN, name=f"/test/{op}", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in x_type],
                              [helper.make_tensor_value_info("Y", out_type or x_type[0][1], [None] * out_rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(ops_schema.SALR_DOMAIN, 1)],
                              functions=ops_schema.function_protos(opset, [op]))
    return model


def _vanilla(model):
    so = ort.SessionOptions()
    so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


LINEAR_CASES = [  # (N, K, R, bias, x dtype, values dtype, leading dims, density)
    (5, 13, 3, True, np.float32, np.float16, (2, 3), 0.5),   # K % 8 != 0, fp16 values, fp32 activations
    (7, 16, 0, False, np.float32, np.float32, (2, 3), 0.5),  # R = 0: a plain sparse layer, no bias
    (8, 9, 2, False, np.float16, np.float16, (1, 4), 0.5),   # fp16 throughout
    (3, 1, 1, True, np.float32, np.float16, (5,), 0.7),      # K = 1, 2-D input
    (4, 12, 2, True, np.float32, np.float16, (1, 2), 0.0),   # nnz = 0
    (11, 40, 5, True, np.float32, np.float32, (2, 1, 3), 0.3),  # 4-D input
]


@pytest.mark.parametrize("n,k,r,bias,xdt,vdt,lead,density", LINEAR_CASES)
def test_salr_linear_body_matches_reference(n, k, r, bias, xdt, vdt, lead, density):
    ops_schema.register_schemas()
    rng = np.random.default_rng(n * 100 + k)
    w, mask = _weight(rng, n, k, density)
    bitmap, values, offsets = reference.encode_bitmap(w, mask, vdt)
    a = rng.standard_normal((r, k)).astype(xdt)
    b = rng.standard_normal((n, r)).astype(xdt)
    bvec = rng.standard_normal(n).astype(xdt)
    x = rng.standard_normal((*lead, k)).astype(xdt)
    inits = [numpy_helper.from_array(bitmap, "bitmap"), numpy_helper.from_array(values, "values"),
             numpy_helper.from_array(offsets, "row_offsets"), numpy_helper.from_array(a, "A_cat"),
             numpy_helper.from_array(b, "B_cat")]
    inputs = ["X", "bitmap", "values", "row_offsets", "A_cat", "B_cat"]
    if bias:
        inits.append(numpy_helper.from_array(bvec, "bias"))
        inputs.append("bias")
    else:
        inputs.append("")  # the optional input omitted explicitly (onnx's ReferenceEvaluator needs the slot)
    x_type = TensorProto.FLOAT if xdt == np.float32 else TensorProto.FLOAT16
    model = _model(ops_schema.SALR_LINEAR, inputs, inits, [("X", x_type, [None] * len(lead) + [k])], len(lead) + 1,
                   in_features=k)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == n

    ref = reference.SALRLinear.eval(x, bitmap, values, offsets, a, b, bvec if bias else None, in_features=k)
    y = _vanilla(model).run(None, {"X": x})[0]
    y_onnx_ref = ReferenceEvaluator(model).run(None, {"X": x})[0]
    tol = TOLERANCES[np.dtype(xdt)]
    for got in (y, y_onnx_ref):
        assert got.dtype == xdt and got.shape == (*lead, n)
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), atol=tol, rtol=0)


LINEAR_Q_CASES = [  # (N, K, R, bias, x dtype, bits, group_size, leading dims, density)
    (5, 13, 3, True, np.float32, 4, 4, (2, 3), 0.5),     # K % 8 != 0, groups spanning rows
    (7, 16, 0, False, np.float32, 8, 32, (2, 3), 0.5),   # R = 0, no bias, one group wider than a row
    (9, 11, 2, True, np.float32, 4, 1, (1, 4), 0.6),     # a scale per value; nnz = 55: an unused high nibble
    (8, 9, 2, False, np.float16, 4, 8, (1, 4), 0.5),     # fp16 activations
    (6, 24, 2, True, np.float16, 8, 6, (3,), 0.5),       # 2-D input
    (4, 12, 2, True, np.float32, 4, 32, (1, 2), 0.0),    # nnz = 0: no values, no scales
]


@pytest.mark.parametrize("n,k,r,bias,xdt,bits,group_size,lead,density", LINEAR_Q_CASES)
def test_salr_linear_q_body_matches_reference(n, k, r, bias, xdt, bits, group_size, lead, density):
    import torch

    from salr_edge.formats.bitmap import bitmap_encode, quantize_bitmap

    ops_schema.register_schemas()
    rng = np.random.default_rng(n * 100 + k)
    w, mask = _weight(rng, n, k, density)
    t = quantize_bitmap(bitmap_encode(torch.from_numpy(w), torch.from_numpy(mask)), bits, group_size)
    bitmap, values, offsets, scales = (v.numpy() for v in (t.bitmap, t.values, t.row_offsets, t.scales))
    a = rng.standard_normal((r, k)).astype(xdt)
    b = rng.standard_normal((n, r)).astype(xdt)
    bvec = rng.standard_normal(n).astype(xdt)
    x = rng.standard_normal((*lead, k)).astype(xdt)
    inits = [numpy_helper.from_array(v, name) for v, name in
             ((bitmap, "bitmap"), (values, "values"), (offsets, "row_offsets"), (scales, "scales"), (a, "A_cat"),
              (b, "B_cat"))]
    inputs = ["X", "bitmap", "values", "row_offsets", "scales", "A_cat", "B_cat"]
    if bias:
        inits.append(numpy_helper.from_array(bvec, "bias"))
        inputs.append("bias")
    else:
        inputs.append("")
    x_type = TensorProto.FLOAT if xdt == np.float32 else TensorProto.FLOAT16
    node = helper.make_node(ops_schema.SALR_LINEAR_Q, inputs, ["Y"], domain=ops_schema.SALR_DOMAIN,
                            in_features=k, bits=bits, group_size=group_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", x_type, [None] * len(lead) + [k])],
                              [helper.make_tensor_value_info("Y", x_type, [None] * (len(lead) + 1))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(ops_schema.SALR_DOMAIN, 1)],
                              functions=ops_schema.function_protos(20, [ops_schema.SALR_LINEAR_Q]))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == n

    ref = reference.SALRLinearQ.eval(x, bitmap, values, offsets, scales, a, b, bvec if bias else None,
                                     in_features=k, bits=bits, group_size=group_size)
    tol = TOLERANCES[np.dtype(xdt)]
    for got in (_vanilla(model).run(None, {"X": x})[0], ReferenceEvaluator(model).run(None, {"X": x})[0]):
        assert got.dtype == xdt and got.shape == (*lead, n)
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), atol=tol, rtol=0)


@pytest.mark.parametrize("n,k,vdt", [(6, 13, np.float16), (3, 8, np.float32), (1, 17, np.float16)])
def test_bitmap_decode_body_matches_reference(n, k, vdt):
    rng = np.random.default_rng(k)
    w, mask = _weight(rng, n, k, 0.5)
    bitmap, values, offsets = reference.encode_bitmap(w, mask, vdt)
    inputs = [("bitmap", TensorProto.UINT8, list(bitmap.shape)),
              ("values", helper.np_dtype_to_tensor_dtype(values.dtype), list(values.shape)),
              ("row_offsets", TensorProto.INT64, list(offsets.shape))]
    model = _model(ops_schema.BITMAP_DECODE, ["bitmap", "values", "row_offsets"], [], inputs, 2, in_features=k,
                   out_type=inputs[1][1])
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [n, k]
    feeds = {"bitmap": bitmap, "values": values, "row_offsets": offsets}
    expected = reference.decode_bitmap(bitmap, values, offsets, k)
    np.testing.assert_array_equal(_vanilla(model).run(None, feeds)[0], expected)
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, feeds)[0], expected)


def test_fused_adapter_gemm_body_matches_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 10)).astype(np.float32)
    a = rng.standard_normal((4, 10)).astype(np.float32)
    b = rng.standard_normal((7, 4)).astype(np.float32)
    model = _model(ops_schema.FUSED_ADAPTER_GEMM, ["X", "A_cat", "B_cat"],
                   [numpy_helper.from_array(a, "A_cat"), numpy_helper.from_array(b, "B_cat")],
                   [("X", TensorProto.FLOAT, [None, None, 10])], 3)
    onnx.checker.check_model(model, full_check=True)
    ref = reference.FusedAdapterGemm.eval(x, a, b)
    np.testing.assert_allclose(_vanilla(model).run(None, {"X": x})[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,k,r,bias,xdt,vdt,lead,density", LINEAR_CASES[:3])
def test_library_kernel_agrees_with_function_body(salr_lib, n, k, r, bias, xdt, vdt, lead, density):
    """Same model, once bound to the library's kernel and once through the body."""
    rng = np.random.default_rng(7)
    w, mask = _weight(rng, n, k, density)
    bitmap, values, offsets = reference.encode_bitmap(w, mask, vdt)
    inits = [numpy_helper.from_array(bitmap, "bitmap"), numpy_helper.from_array(values, "values"),
             numpy_helper.from_array(offsets, "row_offsets"),
             numpy_helper.from_array(rng.standard_normal((r, k)).astype(xdt), "A_cat"),
             numpy_helper.from_array(rng.standard_normal((n, r)).astype(xdt), "B_cat")]
    inputs = ["X", "bitmap", "values", "row_offsets", "A_cat", "B_cat"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(xdt), "bias"))
        inputs.append("bias")
    x_type = TensorProto.FLOAT if xdt == np.float32 else TensorProto.FLOAT16
    model = _model(ops_schema.SALR_LINEAR, inputs, inits, [("X", x_type, [None] * len(lead) + [k])], len(lead) + 1,
                   in_features=k)
    x = rng.standard_normal((*lead, k)).astype(xdt)
    so = ort.SessionOptions()
    so.register_custom_ops_library(salr_lib)
    with_lib = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(with_lib.run(None, {"X": x})[0].astype(np.float64),
                               _vanilla(model).run(None, {"X": x})[0].astype(np.float64),
                               atol=TOLERANCES[np.dtype(xdt)], rtol=0)
