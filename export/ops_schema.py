"""The `com.salr` ONNX operator set: names, schemas and model-local function bodies.

These constants mirror `custom_ops/include/salr_ops.h`; a test parses that header and checks that both
agree. The op contracts are DESIGN.md §3:

- ``BitmapDecode(bitmap, values, row_offsets) -> W [N, K]`` (W has the type of ``values``),
  attribute ``in_features`` = K.
- ``FusedAdapterGemm(X [..., K], A_cat [R, K], B_cat [N, R]) -> Y [..., N]``: Y = (X·A_catᵀ)·B_catᵀ.
- ``SALRLinear(X, bitmap, values, row_offsets, A_cat, B_cat, bias?) -> Y [..., N]``:
  Y = X·Wᵀ + (X·A_catᵀ)·B_catᵀ (+ bias), attribute ``in_features``.
- ``SALRLinearQ(X, bitmap, values, row_offsets, scales, A_cat, B_cat, bias?) -> Y [..., N]``: the same
  with W in bitmap format version 2 (``values`` int8 or packed int4 in uint8, ``scales`` float16 per
  ``group_size`` values; custom_ops/README.md "Bitmap format v2"), attributes ``in_features``, ``bits``
  (4 or 8) and ``group_size``.

Every op also gets an ONNX `FunctionProto` with the same (domain, name) whose body uses only standard
ONNX ops. A runtime without the custom-op library inlines that body and computes the same result
(slowly: it rebuilds the dense weight on every call); a runtime with the library binds the node to
the library's kernel and never looks at the body.
"""

from __future__ import annotations

import logging
from typing import Callable

import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper
from onnx.defs import OpSchema

logger = logging.getLogger(__name__)

SALR_DOMAIN = "com.salr"
SALR_OPSET_VERSION = 1

BITMAP_DECODE = "BitmapDecode"
FUSED_ADAPTER_GEMM = "FusedAdapterGemm"
SALR_LINEAR = "SALRLinear"
SALR_LINEAR_Q = "SALRLinearQ"
OP_TYPES = (BITMAP_DECODE, FUSED_ADAPTER_GEMM, SALR_LINEAR, SALR_LINEAR_Q)
# The fused linear ops the exporter emits, one per compressed layer: float values, quantized values.
LINEAR_OPS = (SALR_LINEAR, SALR_LINEAR_Q)
# Input positions of A_cat and B_cat in each op that takes them.
ADAPTER_INPUTS = {FUSED_ADAPTER_GEMM: (1, 2), SALR_LINEAR: (4, 5), SALR_LINEAR_Q: (5, 6)}

IN_FEATURES_ATTR = "in_features"
BITS_ATTR = "bits"
GROUP_SIZE_ATTR = "group_size"

# The function bodies use BitwiseAnd (opset 18) and Shape(start/end) / CastLike (opset 15).
MIN_DEFAULT_OPSET = 18

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]


# ---- schemas -------------------------------------------------------------------------------------
def _dims(type_proto: onnx.TypeProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    tensor_type = type_proto.tensor_type
    return list(tensor_type.shape.dim) if tensor_type.HasField("shape") else None


def _set_output(ctx, elem_type: int, dims: list | None) -> None:
    """Set output 0 to `elem_type` with `dims` (each an int, a str dim_param or a Dimension)."""
    out = onnx.TypeProto()
    out.tensor_type.elem_type = elem_type
    if dims is not None:
        shape = out.tensor_type.shape
        shape.SetInParent()  # a rank-0 shape must still be present, not absent
        for dim in dims:
            new = shape.dim.add()
            if isinstance(dim, onnx.TensorShapeProto.Dimension):
                new.CopyFrom(dim)
            elif isinstance(dim, int):
                new.dim_value = dim
            elif isinstance(dim, str):
                new.dim_param = dim
    ctx.set_output_type(0, out)


def _linear_like_inference(op_type: str) -> Callable:
    """Shape inference of `op_type`: Y [..., N] of X's type with X's leading dims, N taken from B_cat [N, R]."""
    b_index = ADAPTER_INPUTS[op_type][1]

    def infer(ctx) -> None:
        x_type = ctx.get_input_type(0)
        x_dims = _dims(x_type)
        b_dims = _dims(ctx.get_input_type(b_index)) if ctx.has_input(b_index) else None
        dims = None
        if x_dims is not None:
            n_dim = b_dims[0] if b_dims else onnx.TensorShapeProto.Dimension()
            dims = [*x_dims[:-1], n_dim]
        _set_output(ctx, x_type.tensor_type.elem_type, dims)

    return infer


def _infer_bitmap_decode(ctx) -> None:
    """W [N, K]: the type of `values`, N from the bitmap's rows, K from the attribute."""
    bitmap_dims = _dims(ctx.get_input_type(0))
    values_type = ctx.get_input_type(1)
    in_features = ctx.get_attribute(IN_FEATURES_ATTR)
    k_dim: int | onnx.TensorShapeProto.Dimension = onnx.TensorShapeProto.Dimension()
    if in_features is not None:
        k_dim = in_features.i if isinstance(in_features, AttributeProto) else int(in_features)
    n_dim = bitmap_dims[0] if bitmap_dims else onnx.TensorShapeProto.Dimension()
    _set_output(ctx, values_type.tensor_type.elem_type, [n_dim, k_dim])


def _param(name: str, type_str: str, doc: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, doc, param_option=option)


_IN_FEATURES = OpSchema.Attribute(IN_FEATURES_ATTR, OpSchema.AttrType.INT,
                                  "K, the number of input features (columns of the dense weight)", required=True)
_BITS = OpSchema.Attribute(BITS_ATTR, OpSchema.AttrType.INT, "bits per stored value: 8 (int8) or 4 (packed int4)",
                           required=True)
_GROUP_SIZE = OpSchema.Attribute(GROUP_SIZE_ATTR, OpSchema.AttrType.INT,
                                 "consecutive values (storage order) per float16 scale, >= 1", required=True)
_T_CONSTRAINT = ("T", _FLOAT_TYPES, "activations, adapters, bias and output")
_V_CONSTRAINT = ("V", _FLOAT_TYPES, "stored non-zeros: float16, or the activations' type")
_Q_CONSTRAINT = ("Q", ["tensor(int8)", "tensor(uint8)"], "stored integers: int8 (bits 8) or packed int4 (bits 4)")
_BITMAP_INPUT = _param("bitmap", "tensor(uint8)", "[N, ceil(K/8)]; bit j of byte g in row n is W[n, 8g+j] kept")
_ROW_OFFSETS_INPUT = _param("row_offsets", "tensor(int64)", "[N+1] start of each row among the values; last = nnz")
_BITMAP_INPUTS = [
    _BITMAP_INPUT,
    _param("values", "V", "[nnz] kept entries, row by row, columns ascending"),
    _ROW_OFFSETS_INPUT,
]
_ADAPTER_INPUTS = [_param("A_cat", "T", "[R, K]"), _param("B_cat", "T", "[N, R]"),
                   _param("bias", "T", "[N]", optional=True)]


def _schemas() -> list[tuple[OpSchema, Callable]]:
    decode = OpSchema(
        BITMAP_DECODE, SALR_DOMAIN, SALR_OPSET_VERSION,
        "Decode a bitmap-sparse weight into a dense [N, K] matrix (zeros where pruned).",
        inputs=list(_BITMAP_INPUTS),
        outputs=[_param("W", "V", "[N, K] dense weight")],
        type_constraints=[_V_CONSTRAINT], attributes=[_IN_FEATURES])
    adapter = OpSchema(
        FUSED_ADAPTER_GEMM, SALR_DOMAIN, SALR_OPSET_VERSION,
        "Y = (X·A_catᵀ)·B_catᵀ: every low-rank adapter of a layer concatenated along R, scales folded into B_cat.",
        inputs=[_param("X", "T", "[..., K]"), _param("A_cat", "T", "[R, K]"), _param("B_cat", "T", "[N, R]")],
        outputs=[_param("Y", "T", "[..., N]")],
        type_constraints=[_T_CONSTRAINT])
    linear = OpSchema(
        SALR_LINEAR, SALR_DOMAIN, SALR_OPSET_VERSION,
        "Y = X·Wᵀ + (X·A_catᵀ)·B_catᵀ (+ bias) with W stored as a bitmap; R = 0 is a plain sparse layer.",
        inputs=[_param("X", "T", "[..., K]"), *_BITMAP_INPUTS, *_ADAPTER_INPUTS],
        outputs=[_param("Y", "T", "[..., N]")],
        type_constraints=[_T_CONSTRAINT, _V_CONSTRAINT], attributes=[_IN_FEATURES])
    linear_q = OpSchema(
        SALR_LINEAR_Q, SALR_DOMAIN, SALR_OPSET_VERSION,
        "SALRLinear with W in bitmap format v2: value i = q_i * scales[i // group_size], q int8 or packed int4.",
        inputs=[_param("X", "T", "[..., K]"), _BITMAP_INPUT,
                _param("values", "Q", "int8 [nnz] or uint8 [ceil(nnz/2)] (value i in nibble i % 2 of byte i // 2, "
                                      "low first, q = nibble - 8)"),
                _ROW_OFFSETS_INPUT,
                _param("scales", "tensor(float16)", "[ceil(nnz/group_size)] one scale per group of values"),
                *_ADAPTER_INPUTS],
        outputs=[_param("Y", "T", "[..., N]")],
        type_constraints=[_T_CONSTRAINT, _Q_CONSTRAINT], attributes=[_IN_FEATURES, _BITS, _GROUP_SIZE])
    return [(decode, _infer_bitmap_decode), (adapter, _linear_like_inference(FUSED_ADAPTER_GEMM)),
            (linear, _linear_like_inference(SALR_LINEAR)), (linear_q, _linear_like_inference(SALR_LINEAR_Q))]


def register_schemas() -> None:
    """Register the `com.salr` op schemas with ONNX (idempotent).

    onnx's checker and shape inference, and onnxscript's translation tables, look custom ops up in
    this registry; without it they know nothing of the ops' types and shapes.
    """
    for schema, inference in _schemas():
        if onnx.defs.has(schema.name, SALR_OPSET_VERSION, SALR_DOMAIN):
            continue
        schema.set_type_and_shape_inference_function(inference)
        onnx.defs.register_schema(schema)
        logger.debug("registered ONNX schema %s::%s", SALR_DOMAIN, schema.name)


# ---- function bodies -----------------------------------------------------------------------------
def _const(name: str, value: TensorProto) -> NodeProto:
    return helper.make_node("Constant", [], [name], value=value)


def _attr_ref_const(output: str, attr: str) -> NodeProto:
    """A Constant node whose int value is the calling node's attribute `attr`."""
    node = helper.make_node("Constant", [], [output])
    ref = AttributeProto()
    ref.name = "value_int"
    ref.ref_attr_name = attr
    ref.type = AttributeProto.INT
    node.attribute.append(ref)
    return node


def _decode_nodes(bitmap: str, values: str, row_offsets: str, out: str, prefix: str) -> list[NodeProto]:
    """Nodes that rebuild the dense weight W [N, K] (type of `values`) from the bitmap format.

    ::

        bitmap (N, Kb) uint8                             shifts (8,) = 0..7
          │ Unsqueeze(-1)                                   │
          ▼                                                 │
        (N, Kb, 1) ────────────── BitShift(RIGHT) ◄─────────┘
                                       │ (N, Kb, 8)
                                 BitwiseAnd 1
                                       │ Reshape (N, Kb*8) ; Slice [:, :K]
                                       ▼
                                 bits (N, K) uint8
                     ┌─────────────────┴───────────────────┐
                Cast int64                              Cast bool
                     │ CumSum(axis 1, exclusive)           │ mask
                     ▼                                      │
        row_offsets[:N, None] ─ Add ─► idx (N, K)           │
                                       │                    │
                                       └──► Where(mask, idx, nnz) ◄──┘
                                                │ gidx (N, K)
        values ⧺ [0] (nnz+1,) ─────────────► Gather ─► W (N, K)

    Pruned positions point at the appended zero, so no index is ever out of range, even when a row
    (or the whole matrix) has no kept entry.
    """
    p = prefix
    shifts = helper.make_tensor("shifts", TensorProto.UINT8, [8], list(range(8)))
    return [
        # bits (N, K): the bitmap unpacked, least significant bit first
        _const(f"{p}shifts", shifts),
        _const(f"{p}one_u8", helper.make_tensor("one", TensorProto.UINT8, [], [1])),
        _const(f"{p}axis_last", helper.make_tensor("axis", TensorProto.INT64, [1], [-1])),
        helper.make_node("Unsqueeze", [bitmap, f"{p}axis_last"], [f"{p}bytes"]),  # (N, Kb, 1)
        helper.make_node("BitShift", [f"{p}bytes", f"{p}shifts"], [f"{p}shifted"], direction="RIGHT"),  # (N, Kb, 8)
        helper.make_node("BitwiseAnd", [f"{p}shifted", f"{p}one_u8"], [f"{p}bits8"]),  # (N, Kb, 8)
        helper.make_node("Shape", [bitmap], [f"{p}n"], start=0, end=1),  # (1,) = [N]
        _const(f"{p}minus_one", helper.make_tensor("m1", TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", [f"{p}n", f"{p}minus_one"], [f"{p}flat_shape"], axis=0),
        helper.make_node("Reshape", [f"{p}bits8", f"{p}flat_shape"], [f"{p}bits_padded"]),  # (N, Kb*8)
        _attr_ref_const(f"{p}k_scalar", IN_FEATURES_ATTR),
        _const(f"{p}zero_1d", helper.make_tensor("z", TensorProto.INT64, [1], [0])),
        _const(f"{p}one_1d", helper.make_tensor("o", TensorProto.INT64, [1], [1])),
        _const(f"{p}one_scalar", helper.make_tensor("o0", TensorProto.INT64, [], [1])),
        helper.make_node("Unsqueeze", [f"{p}k_scalar", f"{p}zero_1d"], [f"{p}k_1d"]),  # (1,) = [K]
        helper.make_node("Slice", [f"{p}bits_padded", f"{p}zero_1d", f"{p}k_1d", f"{p}one_1d"], [f"{p}bits"]),
        # idx (N, K): where each kept entry sits in `values`
        helper.make_node("Cast", [f"{p}bits"], [f"{p}bits_i64"], to=TensorProto.INT64),
        helper.make_node("CumSum", [f"{p}bits_i64", f"{p}one_scalar"], [f"{p}rank_in_row"], exclusive=1),
        helper.make_node("Slice", [row_offsets, f"{p}zero_1d", f"{p}minus_one"], [f"{p}row_start"]),  # (N,)
        helper.make_node("Unsqueeze", [f"{p}row_start", f"{p}one_1d"], [f"{p}row_start_col"]),  # (N, 1)
        helper.make_node("Add", [f"{p}row_start_col", f"{p}rank_in_row"], [f"{p}idx"]),
        # W (N, K): gather kept values; pruned positions read the appended zero at index nnz
        helper.make_node("Cast", [f"{p}bits"], [f"{p}mask"], to=TensorProto.BOOL),
        helper.make_node("Shape", [values], [f"{p}nnz"]),  # (1,) = [nnz]
        helper.make_node("Where", [f"{p}mask", f"{p}idx", f"{p}nnz"], [f"{p}gidx"]),
        _const(f"{p}zero_f", helper.make_tensor("zf", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("CastLike", [f"{p}zero_f", values], [f"{p}zero_v"]),
        helper.make_node("Concat", [values, f"{p}zero_v"], [f"{p}values_padded"], axis=0),  # (nnz+1,)
        helper.make_node("Gather", [f"{p}values_padded", f"{p}gidx"], [out], axis=0),  # (N, K)
    ]


def _opset_imports(default_opset: int) -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", default_opset)]


def bitmap_decode_function(default_opset: int) -> FunctionProto:
    """The body of `com.salr::BitmapDecode` (diagram in `_decode_nodes`)."""
    nodes = _decode_nodes("bitmap", "values", "row_offsets", "W", prefix="")
    return helper.make_function(SALR_DOMAIN, BITMAP_DECODE, ["bitmap", "values", "row_offsets"], ["W"], nodes,
                                _opset_imports(default_opset), attributes=[IN_FEATURES_ATTR],
                                doc_string="Reference body of com.salr::BitmapDecode in standard ONNX ops.")


def fused_adapter_gemm_function(default_opset: int) -> FunctionProto:
    """The body of `com.salr::FusedAdapterGemm`.

    ::

        X (..., K) ── MatMul ◄── Transpose ── A_cat (R, K)
                        │ (..., R)
                      MatMul ◄── Transpose ── B_cat (N, R)
                        │
                        ▼ Y (..., N)
    """
    nodes = [
        helper.make_node("Transpose", ["A_cat"], ["A_t"], perm=[1, 0]),  # (K, R)
        helper.make_node("MatMul", ["X", "A_t"], ["T"]),  # (..., R)
        helper.make_node("Transpose", ["B_cat"], ["B_t"], perm=[1, 0]),  # (R, N)
        helper.make_node("MatMul", ["T", "B_t"], ["Y"]),  # (..., N)
    ]
    return helper.make_function(SALR_DOMAIN, FUSED_ADAPTER_GEMM, ["X", "A_cat", "B_cat"], ["Y"], nodes,
                                _opset_imports(default_opset),
                                doc_string="Reference body of com.salr::FusedAdapterGemm in standard ONNX ops.")


def _linear_nodes(values: str) -> list[NodeProto]:
    """The nodes of SALRLinear's body (diagram in `salr_linear_function`), reading float values `values`."""
    return [
        # X2 (M, K): Gemm is 2-D only
        helper.make_node("Shape", ["X"], ["x_k"], start=-1),  # (1,) = [K]
        helper.make_node("Constant", [], ["minus_one"], value=helper.make_tensor("m1", TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", ["minus_one", "x_k"], ["x2_shape"], axis=0),
        helper.make_node("Reshape", ["X", "x2_shape"], ["X2"]),  # (M, K)
        *_decode_nodes("bitmap", values, "row_offsets", "W_values", prefix="decode/"),
        helper.make_node("CastLike", ["W_values", "X"], ["W"]),  # (N, K) in X's type
        helper.make_node("Gemm", ["X2", "W", "bias"], ["Yb"], transB=1),  # (M, N)
        helper.make_node("Gemm", ["X2", "A_cat"], ["T"], transB=1),  # (M, R)
        helper.make_node("Gemm", ["T", "B_cat", "Yb"], ["Y2"], transB=1),  # (M, N)
        helper.make_node("Shape", ["X"], ["lead"], start=0, end=-1),  # (rank-1,)
        helper.make_node("Shape", ["B_cat"], ["n"], start=0, end=1),  # (1,) = [N]
        helper.make_node("Concat", ["lead", "n"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["Y2", "y_shape"], ["Y"]),  # (..., N)
    ]


def salr_linear_function(default_opset: int) -> FunctionProto:
    """The body of `com.salr::SALRLinear`.

    ::

        X (..., K) ─ Reshape ─► X2 (M, K)
                                 │
        bitmap, values,          │
        row_offsets ─ [decode] ─ CastLike X ─► W (N, K)
                                 │
                   X2 ─ Gemm(transB) ◄─ W, bias?          ─► Yb (M, N)
                   X2 ─ Gemm(transB) ◄─ A_cat (R, K)      ─► T  (M, R)
                   T  ─ Gemm(transB, C = Yb) ◄─ B_cat (N, R) ─► Y2 (M, N)
                                 │
                       Reshape to (..., N) ─► Y

    Gemm's third input is optional, which is how a bias that the caller omitted disappears from the
    body (Add would need it). The adapter output is accumulated onto Yb through the last Gemm's C.
    """
    return helper.make_function(SALR_DOMAIN, SALR_LINEAR,
                                ["X", "bitmap", "values", "row_offsets", "A_cat", "B_cat", "bias"], ["Y"],
                                _linear_nodes("values"), _opset_imports(default_opset), attributes=[IN_FEATURES_ATTR],
                                doc_string="Reference body of com.salr::SALRLinear in standard ONNX ops.")


def _int4_codes_branch(values: str, nnz: str, out: str) -> onnx.GraphProto:
    """If-branch: q (nnz,) float32 from packed int4 `values` uint8 [ceil(nnz/2)] (nibble u -> q = u - 8).

    The Cast to uint8 changes nothing for int4's uint8 values; it lets the branch type-check when the
    node's values are int8 (bits 8), where the branch exists but never runs.
    """
    p = "int4/"
    nodes = [
        helper.make_node("Cast", [values], [f"{p}bytes"], to=TensorProto.UINT8),  # (P,)
        _const(f"{p}axis_last", helper.make_tensor("axis", TensorProto.INT64, [1], [-1])),
        helper.make_node("Unsqueeze", [f"{p}bytes", f"{p}axis_last"], [f"{p}bytes_col"]),  # (P, 1)
        _const(f"{p}shifts", helper.make_tensor("shifts", TensorProto.UINT8, [2], [0, 4])),  # low nibble first
        helper.make_node("BitShift", [f"{p}bytes_col", f"{p}shifts"], [f"{p}shifted"], direction="RIGHT"),  # (P, 2)
        _const(f"{p}low_mask", helper.make_tensor("m", TensorProto.UINT8, [], [0x0F])),
        helper.make_node("BitwiseAnd", [f"{p}shifted", f"{p}low_mask"], [f"{p}nibbles2"]),  # (P, 2)
        helper.make_node("Reshape", [f"{p}nibbles2", f"{p}axis_last"], [f"{p}nibbles_padded"]),  # (2P,)
        _const(f"{p}zero_1d", helper.make_tensor("z", TensorProto.INT64, [1], [0])),
        helper.make_node("Slice", [f"{p}nibbles_padded", f"{p}zero_1d", nnz], [f"{p}nibbles"]),  # (nnz,)
        helper.make_node("Cast", [f"{p}nibbles"], [f"{p}nibbles_f"], to=TensorProto.FLOAT),
        _const(f"{p}offset", helper.make_tensor("o", TensorProto.FLOAT, [], [8.0])),
        helper.make_node("Sub", [f"{p}nibbles_f", f"{p}offset"], [out]),  # (nnz,) q in [-8, 7]
    ]
    return helper.make_graph(nodes, "int4_codes", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _int8_codes_branch(values: str, out: str) -> onnx.GraphProto:
    """If-branch: q (nnz,) float32 from int8 `values` [nnz]."""
    nodes = [helper.make_node("Cast", [values], [out], to=TensorProto.FLOAT)]
    return helper.make_graph(nodes, "int8_codes", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _dequantize_nodes(values: str, row_offsets: str, scales: str, out: str, prefix: str) -> list[NodeProto]:
    """Nodes that turn bitmap-format-v2 `values` + `scales` into float32 values (nnz,) = q_i * scales[i // group_size].

    ::

        row_offsets[-1:] ─► nnz (1,)
        bits == 4 ─► If ─ then: values ─ Cast uint8 ─ Unsqueeze ─ BitShift [0, 4] ─ BitwiseAnd 15
                    │                   ─ Reshape (2P,) ─ Slice [:nnz] ─ Cast float ─ Sub 8 ─► q
                    └─ else: values (int8) ─ Cast float ─────────────────────────────────► q
                                                                                           │ (nnz,)
        Range(0, nnz) ─ Div group_size ─► group (nnz,) ─ Gather ◄─ Cast float ◄─ scales    │
                                                           │ s (nnz,)                      │
                                                           └──────────── Mul ◄─────────────┘
                                                                          ▼ out (nnz,) float32

    q·s is exact in float32 (q has at most 8 bits, an fp16 scale 11), so the body computes the very
    values the PyTorch module multiplies by.
    """
    p = prefix
    return [
        _const(f"{p}last", helper.make_tensor("last", TensorProto.INT64, [1], [-1])),
        _const(f"{p}end", helper.make_tensor("end", TensorProto.INT64, [1], [2**63 - 1])),
        helper.make_node("Slice", [row_offsets, f"{p}last", f"{p}end"], [f"{p}nnz"]),  # (1,) = [nnz]
        _attr_ref_const(f"{p}bits", BITS_ATTR),
        _const(f"{p}four", helper.make_tensor("four", TensorProto.INT64, [], [4])),
        helper.make_node("Equal", [f"{p}bits", f"{p}four"], [f"{p}is_int4"]),
        helper.make_node("If", [f"{p}is_int4"], [f"{p}q"],
                         then_branch=_int4_codes_branch(values, f"{p}nnz", f"{p}q_int4"),
                         else_branch=_int8_codes_branch(values, f"{p}q_int8")),  # (nnz,) float32
        _const(f"{p}zero", helper.make_tensor("zero", TensorProto.INT64, [], [0])),
        _const(f"{p}one", helper.make_tensor("one", TensorProto.INT64, [], [1])),
        helper.make_node("Squeeze", [f"{p}nnz"], [f"{p}nnz_scalar"]),
        helper.make_node("Range", [f"{p}zero", f"{p}nnz_scalar", f"{p}one"], [f"{p}index"]),  # (nnz,)
        _attr_ref_const(f"{p}group_size", GROUP_SIZE_ATTR),
        helper.make_node("Div", [f"{p}index", f"{p}group_size"], [f"{p}group"]),  # (nnz,) i // group_size
        helper.make_node("Cast", [scales], [f"{p}scales_f"], to=TensorProto.FLOAT),
        helper.make_node("Gather", [f"{p}scales_f", f"{p}group"], [f"{p}s"], axis=0),  # (nnz,)
        helper.make_node("Mul", [f"{p}q", f"{p}s"], [out]),  # (nnz,)
    ]


def salr_linear_q_function(default_opset: int) -> FunctionProto:
    """The body of `com.salr::SALRLinearQ`: the values dequantized (`_dequantize_nodes`), then SALRLinear's body."""
    nodes = [*_dequantize_nodes("values", "row_offsets", "scales", "values_f", prefix="dequant/"),
             *_linear_nodes("values_f")]
    return helper.make_function(SALR_DOMAIN, SALR_LINEAR_Q,
                                ["X", "bitmap", "values", "row_offsets", "scales", "A_cat", "B_cat", "bias"], ["Y"],
                                nodes, _opset_imports(default_opset),
                                attributes=[IN_FEATURES_ATTR, BITS_ATTR, GROUP_SIZE_ATTR],
                                doc_string="Reference body of com.salr::SALRLinearQ in standard ONNX ops.")


FUNCTION_BUILDERS: dict[str, Callable[[int], FunctionProto]] = {
    BITMAP_DECODE: bitmap_decode_function,
    FUSED_ADAPTER_GEMM: fused_adapter_gemm_function,
    SALR_LINEAR: salr_linear_function,
    SALR_LINEAR_Q: salr_linear_q_function,
}


def function_protos(default_opset: int, op_types: tuple[str, ...] | list[str] = OP_TYPES) -> list[FunctionProto]:
    """The model-local functions for `op_types`, importing the default domain at `default_opset`.

    Args:
        default_opset: the model's default-domain opset; the function must import the same one.
        op_types: which ops to build bodies for.

    Raises:
        ValueError: `default_opset` is below `MIN_DEFAULT_OPSET` or an op type is unknown.
    """
    if default_opset < MIN_DEFAULT_OPSET:
        raise ValueError(f"the com.salr function bodies need default opset >= {MIN_DEFAULT_OPSET}, got {default_opset}")
    unknown = sorted(set(op_types) - set(OP_TYPES))
    if unknown:
        raise ValueError(f"unknown com.salr op types {unknown}; known: {list(OP_TYPES)}")
    return [FUNCTION_BUILDERS[op](default_opset) for op in OP_TYPES if op in op_types]
