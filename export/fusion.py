"""Graph pass: compressed layers that read the same activations become one `com.salr` node.

A decoder layer projects one normalized hidden state three times (q, k, v) and the MLP's input twice
(gate, up). Exported as-is that is five `SALRLinear(Q)` calls, each paying the op's fixed costs: an ORT
dispatch, a thread-pool wake-up, the activation row prepared (for `SALRLinearQ`: quantized to int8 per
block) and X·A_catᵀ. At batch 1 on a small model those costs are a large part of a call (SmolLM2: 15-40 µs
a call, 210 calls a token), so one node per shared input runs the same bytes with fewer fixed costs.

The fused node is the op contract applied to stacked weights, so no new op is needed:
- bitmap, bias: rows stacked (a missing bias is zeros);
- values, scales: concatenated; row_offsets shifted by the previous members' non-zeros;
- A_cat: stacked along R; B_cat: block-diagonal [ΣN, ΣR] (member i's outputs read only its own ranks),
  built in the graph from the members' own B by Pad + Concat, which ORT folds into a constant at load, so
  no zero block is stored in the file. A Cast of narrowed adapters (`exporter._narrow_adapters`) is kept.
Its output is split back along the last axis, so every consumer sees the tensor it saw before.

A quantized member's scales cover `group_size` consecutive values (possibly spanning rows) and int4
values are packed two per byte: a member can be followed by another only when its non-zeros fill whole
groups and whole bytes, or the groups would straddle two members. Layers that cannot be placed that way are
left as they are.
"""

from __future__ import annotations

import numpy as np

from . import ops_schema

# Input positions of each fusable op: the weight tensors, then the adapters, then the optional bias.
_WEIGHTS = {ops_schema.SALR_LINEAR: ("bitmap", "values", "row_offsets"),
            ops_schema.SALR_LINEAR_Q: ("bitmap", "values", "row_offsets", "scales")}


def _const(value) -> np.ndarray | None:
    """The constant array behind `value` when it is an initializer, else None.

    The exporter stores equal constants once (2:4 layers of one shape share their row offsets), so an
    initializer may have other readers: it is copied into the fused tensors and dropped only when unused.
    """
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def _stored(value) -> tuple[object, int | None] | None:
    """(initializer, Cast target or None) behind an adapter input: the initializer itself, or a Cast of one
    read only here (adapters stored narrower than the activations, `exporter._narrow_adapters`)."""
    if _const(value) is not None:
        return value, None
    producer = value.producer() if value is not None else None
    if (producer is not None and producer.op_type == "Cast" and producer.domain == "" and len(value.uses()) == 1
            and _const(producer.inputs[0]) is not None):
        return producer.inputs[0], producer.attributes["to"].value
    return None


def _member(node) -> dict | None:
    """The constant tensors of one fusable node (by role), or None when it cannot be fused."""
    if node.domain != ops_schema.SALR_DOMAIN or node.op_type not in _WEIGHTS or not node.inputs or \
            node.inputs[0] is None or len(node.outputs) != 1 or node.outputs[0].is_graph_output():
        return None
    inputs = list(node.inputs) + [None] * (len(_WEIGHTS[node.op_type]) + 4 - len(node.inputs))
    member: dict = {}
    for index, role in enumerate(_WEIGHTS[node.op_type], start=1):
        member[role] = _const(inputs[index])
        if member[role] is None:
            return None
    first_adapter = len(_WEIGHTS[node.op_type]) + 1
    for role, value in zip(("A_cat", "B_cat"), inputs[first_adapter:first_adapter + 2]):
        stored = _stored(value)
        if stored is None:
            return None
        member[role], member[role + ".cast"] = stored
        member[role + ".array"] = _const(stored[0])
    bias = inputs[first_adapter + 2]
    member["bias"] = None if bias is None else _const(bias)
    if bias is not None and member["bias"] is None:
        return None
    if member["bitmap"].ndim != 2 or member["A_cat.array"].ndim != 2 or member["B_cat.array"].ndim != 2:
        return None
    member["nnz"] = int(member["row_offsets"][-1]) if member["row_offsets"].size else 0
    return member


def _key(node, member: dict) -> tuple:
    """Nodes with equal keys compute the same kind of layer on the same input and can share one node."""
    attributes = tuple(sorted((name, attr.value) for name, attr in node.attributes.items()))
    # a missing bias is filled with zeros, so only the present ones' dtype matters (they are X's type)
    dtypes = tuple(member[r].dtype.str for r in _WEIGHTS[node.op_type]) + tuple(
        (member[r + ".array"].dtype.str, member[r + ".cast"]) for r in ("A_cat", "B_cat"))
    return (id(node.inputs[0]), node.op_type, attributes, dtypes)


def _closes_alignment(node, member: dict) -> bool:
    """Whether another member may follow this one: its values end on a scale-group and byte boundary."""
    if node.op_type != ops_schema.SALR_LINEAR_Q:
        return True
    bits = node.attributes[ops_schema.BITS_ATTR].value
    group = node.attributes[ops_schema.GROUP_SIZE_ATTR].value
    nnz = member["nnz"]
    return nnz % group == 0 and (bits == 8 or nnz % 2 == 0)


def _ordered(nodes: list, members: list[dict]) -> list[int]:
    """Member indices in graph order with at most one unaligned member, placed last."""
    aligned = [i for i in range(len(nodes)) if _closes_alignment(nodes[i], members[i])]
    unaligned = [i for i in range(len(nodes)) if i not in aligned]
    return aligned + unaligned[:1]


def _stacked(members: list[dict]) -> dict[str, np.ndarray | None]:
    """The fused node's constants but B_cat: the op contract of DESIGN.md §3 over the stacked weights."""
    out: dict[str, np.ndarray | None] = {
        "bitmap": np.concatenate([m["bitmap"] for m in members], axis=0),
        "values": np.concatenate([m["values"] for m in members]),
    }
    offsets, base = [np.zeros(1, dtype=np.int64)], 0
    for m in members:
        offsets.append(m["row_offsets"][1:].astype(np.int64) + base)
        base += m["nnz"]
    out["row_offsets"] = np.concatenate(offsets)
    if "scales" in members[0]:
        out["scales"] = np.concatenate([m["scales"] for m in members])
    out["A_cat"] = np.concatenate([m["A_cat.array"] for m in members], axis=0)
    if any(m["bias"] is not None for m in members):
        dtype = next(m["bias"].dtype for m in members if m["bias"] is not None)
        out["bias"] = np.concatenate([m["bias"] if m["bias"] is not None else
                                      np.zeros(m["bitmap"].shape[0], dtype=dtype) for m in members])
    else:
        out["bias"] = None
    return out


def _fused_name(names: list[str]) -> str:
    """'/model/layers.0/self_attn/q_proj/SALRLinear' x3 -> '/model/layers.0/self_attn/q_proj+k_proj+v_proj/SALRLinear'."""
    parts = [name.split("/") for name in names]
    if all(len(p) >= 2 and p[:-2] == parts[0][:-2] and p[-1] == parts[0][-1] for p in parts):
        return "/".join([*parts[0][:-2], "+".join(p[-2] for p in parts), parts[0][-1]])
    return "+".join(names)


def _initializer_prefix(node) -> str:
    """The module path its initializers are named after ('model.layers.0.self_attn.q_proj')."""
    name = node.inputs[1].name  # '{module}.weight.bitmap'
    return name[: -len(".weight.bitmap")] if name.endswith(".weight.bitmap") else name


def _initializer(name: str, array: np.ndarray):
    import onnx_ir as ir

    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                    const_value=ir.tensor(array))


def _block_diagonal_b(members: list[dict], prefixes: list[str], prefix: str, name: str) -> tuple[list, object]:
    """(nodes, value) of the fused B_cat: each member's stored B (cast to the activations' type when stored
    narrower) padded to its ranks' columns, stacked.

    The members' B stay on disk as they are (no stored zeros); ORT folds these constant nodes into one
    initializer at load, so the kernel still reads a constant B. The Cast comes first because ORT's CPU Pad
    has no float16 kernel, and a node it cannot run is not folded.
    """
    import onnx_ir as ir

    total = sum(m["B_cat.array"].shape[1] for m in members)
    nodes, pieces, col = [], [], 0
    for i, (m, member_prefix) in enumerate(zip(members, prefixes)):
        rank = m["B_cat.array"].shape[1]
        cast_nodes, b = _cast(m["B_cat"], m["B_cat.cast"], f"{name}/Cast_B{i}")
        m["pads"] = _initializer(f"{member_prefix}.B_cat.pads",
                                 np.asarray([0, col, 0, total - col - rank], dtype=np.int64))
        pad = ir.node("Pad", [b, m["pads"]], name=f"{name}/Pad_B{i}")
        pad.outputs[0].name = f"{member_prefix}.B_cat/padded"
        nodes += [*cast_nodes, pad]
        pieces.append(pad.outputs[0])
        col += rank
    concat = ir.node("Concat", pieces, {"axis": 0}, name=f"{name}/Concat_B")
    concat.outputs[0].name = f"{prefix}.B_cat"
    nodes.append(concat)
    return nodes, concat.outputs[0]


def _cast(value, to: int | None, name: str) -> tuple[list, object]:
    import onnx_ir as ir

    if to is None:
        return [], value
    cast = ir.node("Cast", [value], {"to": to}, name=name)
    cast.outputs[0].name = f"{value.name}/cast"
    return [cast], cast.outputs[0]


def _drop_unused(graph, value) -> None:
    """Remove `value` once nothing reads it: an initializer, or a Cast of one (and then that initializer)."""
    if value is None or value.uses():
        return
    if value.is_initializer():
        graph.initializers.pop(value.name, None)
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast":
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        _drop_unused(graph, source)


def _fuse(graph, nodes: list, members: list[dict]) -> None:
    import onnx_ir as ir

    stacked = _stacked(members)
    prefixes = [_initializer_prefix(n) for n in nodes]
    common = prefixes[0].rsplit(".", 1)[0]
    prefix = common + "." + "+".join(p.rsplit(".", 1)[-1] for p in prefixes) \
        if all(p.rsplit(".", 1)[0] == common for p in prefixes) else "+".join(prefixes)
    name = _fused_name([n.name for n in nodes])
    names = {"bitmap": "weight.bitmap", "values": "weight.values", "row_offsets": "weight.row_offsets",
             "scales": "weight.scales", "A_cat": "A_cat", "bias": "bias"}
    new_nodes: list = []
    inputs = [nodes[0].inputs[0]]
    for role in _WEIGHTS[nodes[0].op_type]:
        value = _initializer(f"{prefix}.{names[role]}", stacked[role])
        graph.register_initializer(value)
        inputs.append(value)
    a = _initializer(f"{prefix}.A_cat", stacked["A_cat"])
    graph.register_initializer(a)
    cast_nodes, a = _cast(a, members[0]["A_cat.cast"], f"{name}/Cast_A")
    new_nodes += cast_nodes
    b_nodes, b = _block_diagonal_b(members, prefixes, prefix, name)
    for m in members:
        graph.register_initializer(m["pads"])
    new_nodes += b_nodes
    inputs += [a, b]
    if stacked["bias"] is not None:
        bias = _initializer(f"{prefix}.bias", stacked["bias"])
        graph.register_initializer(bias)
        inputs.append(bias)
    attributes = {key: attr.value for key, attr in nodes[0].attributes.items()}
    fused = ir.node(nodes[0].op_type, inputs, attributes, domain=ops_schema.SALR_DOMAIN, name=name)
    out = fused.outputs[0]
    out.name = f"{name}/output_0"
    if nodes[0].outputs[0].dtype is not None:
        out.dtype = nodes[0].outputs[0].dtype
    widths = np.asarray([m["bitmap"].shape[0] for m in members], dtype=np.int64)
    split_sizes = _initializer(f"{prefix}.split_sizes", widths)
    graph.register_initializer(split_sizes)
    split = ir.node("Split", [out, split_sizes], {"axis": -1}, num_outputs=len(nodes), name=f"{name}/Split")
    first = min(nodes, key=lambda n: list(graph).index(n))
    graph.insert_before(first, [*new_nodes, fused, split])
    for node, piece in zip(nodes, split.outputs):
        old = node.outputs[0]
        piece.name, piece.shape = old.name, old.shape
        if old.dtype is not None:
            piece.dtype = old.dtype
        old.name = f"{old.name}/unfused"
        old.replace_all_uses_with(piece)
        constants = list(node.inputs[1:])  # removing the node detaches its inputs
        graph.remove(node, safe=True)
        for value in constants:
            _drop_unused(graph, value)


def fuse_shared_input_linears(ir_model) -> tuple[int, int]:
    """Fuse the `SALRLinear(Q)` nodes that read the same input into one node + Split (module docstring).

    Returns:
        (layers fused, nodes they became).
    """
    graph = ir_model.graph
    groups: dict[tuple, list] = {}
    for node in graph:
        member = _member(node)
        if member is not None:
            groups.setdefault(_key(node, member), []).append((node, member))
    layers = fused = 0
    for entries in groups.values():
        if len(entries) < 2:
            continue
        nodes = [n for n, _ in entries]
        members = [m for _, m in entries]
        order = _ordered(nodes, members)
        if len(order) < 2:
            continue
        _fuse(graph, [nodes[i] for i in order], [members[i] for i in order])
        layers += len(order)
        fused += 1
    return layers, fused
