"""Graph pass: ONNX `Attention` takes the projections and the KV cache as they are.

torch's exporter lowers a transformers attention block to the 4-D form of ONNX `Attention` (opset 23): each of
q, k and v is reshaped to [B, S, heads, D] and transposed to [B, heads, S, D], rotary embedding runs on that,
the new k and v are appended to the cache by a `Concat` per tensor, and the output is transposed and reshaped
back to [B, S, heads·D]. `Attention` and `RotaryEmbedding` both accept the 3-D [B, S, heads·D] layout given
their head counts, and `Attention` appends to the cache itself (`past_key`/`past_value` in, `present_key`/
`present_value` out). This pass rewrites each block to that form: per layer and step, 4 Reshapes, 4
Transposes and 2 Concats fewer (and the copies they make), plus the shape arithmetic that fed the Reshapes,
with the same outputs: the graph's `present.{i}.key/value` are now the `Attention` node's own outputs.

A block that does not match the pattern exactly (another consumer of an intermediate, a different permutation,
rotary on v, ...) is left alone.
"""

from __future__ import annotations

_HEADS_PERM = (0, 2, 1, 3)


def _producer(value, op_type: str):
    """The node of type `op_type` (default domain) that produces `value`, or None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _only_use(value, node) -> bool:
    return not value.is_graph_output() and [u.node for u in value.uses()] == [node]


def _perm(node) -> tuple | None:
    attr = node.attributes.get("perm")
    return tuple(attr.value) if attr is not None else None


def _heads_layout(value, consumer) -> tuple[object, list] | None:
    """(3-D source, [Reshape, Transpose]) when `value` = Transpose(0,2,1,3)(Reshape(source)) read only here."""
    transpose = _producer(value, "Transpose")
    if transpose is None or _perm(transpose) != _HEADS_PERM or not _only_use(value, consumer):
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None or not _only_use(transpose.inputs[0], transpose):
        return None
    return reshape.inputs[0], [reshape, transpose]


def _rotary_over_heads(value, consumer) -> tuple[object, object, list] | None:
    """(rotary node, 3-D source, nodes) when `value` = RotaryEmbedding(heads_layout(source)) read only here."""
    rotary = _producer(value, "RotaryEmbedding")
    if rotary is None or not _only_use(value, consumer) or len(rotary.inputs) != 3 or "num_heads" not in \
            rotary.attributes:
        return None
    layout = _heads_layout(rotary.inputs[0], rotary)
    if layout is None:
        return None
    source, nodes = layout
    return rotary, source, nodes + [rotary]


def _cache_append(value) -> tuple[object, object, object] | None:
    """(Concat, past, new) when `value` = Concat(past, new) along the sequence axis of [B, heads, S, D]."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].value not in (2, -2):
        return None
    past = concat.inputs[0]
    if past is None or not past.is_graph_input():
        return None
    return concat, past, concat.inputs[1]


def _rewrite(graph, attention) -> bool:
    import onnx_ir as ir

    inputs = list(attention.inputs)
    if len(inputs) not in (3, 4) or len(attention.outputs) != 1 or any(k in attention.attributes for k in
                                                                         ("q_num_heads", "kv_num_heads")):
        return False
    q = _rotary_over_heads(inputs[0], attention)
    key, value = _cache_append(inputs[1]), _cache_append(inputs[2])
    if q is None or key is None or value is None:
        return False
    key_concat, past_key, new_key = key
    value_concat, past_value, new_value = value
    # present K/V: the graph outputs, read by this Attention and nothing else
    for present in inputs[1:3]:
        if not present.is_graph_output() or [u.node for u in present.uses()] != [attention]:
            return False
    k = _rotary_over_heads(new_key, key_concat)
    v = _heads_layout(new_value, value_concat)
    out_t = next(iter(attention.outputs[0].uses()), None)
    if k is None or v is None or out_t is None or len(attention.outputs[0].uses()) != 1:
        return False
    out_t = out_t.node
    if out_t.op_type != "Transpose" or _perm(out_t) != _HEADS_PERM or len(out_t.outputs[0].uses()) != 1:
        return False
    out_reshape = next(iter(out_t.outputs[0].uses())).node
    if out_reshape.op_type != "Reshape" or out_reshape.inputs[0] is not out_t.outputs[0]:
        return False
    # the Reshape must merge the heads back into [B, S, heads·D], the layout 3-D Attention returns
    if out_reshape.outputs[0].shape is not None and len(out_reshape.outputs[0].shape) != 3:
        return False
    q_rotary, q3, q_nodes = q
    k_rotary, k3, k_nodes = k
    v3, v_nodes = v
    q_heads = q_rotary.attributes["num_heads"].value
    kv_heads = k_rotary.attributes["num_heads"].value

    def rotary(source, old):
        attributes = {name: attr.value for name, attr in old.attributes.items()}
        node = ir.node("RotaryEmbedding", [source, *old.inputs[1:]], attributes, name=f"{old.name}_3d")
        node.outputs[0].name = f"{old.name}_3d/output_0"
        node.outputs[0].dtype = old.outputs[0].dtype
        return node

    new_q, new_k = rotary(q3, q_rotary), rotary(k3, k_rotary)
    attributes = {name: attr.value for name, attr in attention.attributes.items()}
    attributes.update(q_num_heads=q_heads, kv_num_heads=kv_heads)
    mask = inputs[3] if len(inputs) == 4 else None
    fused = ir.node("Attention", [new_q.outputs[0], new_k.outputs[0], v3, mask, past_key, past_value], attributes,
                    num_outputs=3, name=f"{attention.name}_3d")
    y, present_key, present_value = fused.outputs
    graph.insert_before(attention, [new_q, new_k, fused])
    result = out_reshape.outputs[0]
    y.name, y.dtype, y.shape = result.name, result.dtype, result.shape
    result.name = f"{result.name}/replaced"
    result.replace_all_uses_with(y)
    for new, old in ((present_key, inputs[1]), (present_value, inputs[2])):
        new.dtype, new.shape = old.dtype, old.shape
        name = old.name
        old.name = f"{name}/replaced"
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name = name
    # the old chain, consumers first so every node is unused when it goes
    for node in [out_reshape, out_t, attention, key_concat, value_concat, *reversed(q_nodes), *reversed(k_nodes),
                 *reversed(v_nodes)]:
        graph.remove(node, safe=True)
    return True


def fold_attention_layout(ir_model) -> int:
    """Rewrite every matching attention block to 3-D `Attention` with the KV cache inside (module docstring).

    Returns:
        Number of blocks rewritten.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = ir_model.graph
    rewritten = sum(_rewrite(graph, node) for node in list(graph)
                    if node.op_type == "Attention" and node.domain in ("", "ai.onnx"))
    if rewritten:
        # the shape arithmetic that fed the removed Reshapes
        RemoveUnusedNodesPass()(ir_model)
    return rewritten
