"""Export a (compressed) transformers causal LM to one ONNX decoder with a KV cache.

Recipe (DESIGN.md §3, measured with torch 2.13's dynamo exporter and transformers 5.x):

- `_DecoderWrapper` takes flat ``past_key_values.{i}.key/value`` inputs, loads them into a
  `DynamicCache` and returns logits and each layer's ``present.{i}.key/value``; `dynamic_shapes`
  mirrors its signature with batch, sequence, past and total length as separate dims.
- Every `SparseLowRankLinear` is swapped for `_SALRLinearExport`, whose forward emits one
  ``com.salr::SALRLinear`` node (``SALRLinearQ`` for a quantized base) through `torch.onnx.ops.symbolic`
  (bitmap, values, row offsets, scales and the fused adapters become initializers).
- The dynamo exporter drops model-local functions, so the function bodies are appended to the
  exported IR model afterwards, with the model's default-domain opset.
- Nodes are renamed after the module they come from (``/model/layers.3/mlp/down_proj/SALRLinear``),
  values after their node (``{node}/output_{k}``), initializers after their module.
- Everything is written into a staging folder beside the output and renamed into place at the end,
  so an error leaves nothing behind.

The caller's model is never changed: modules are swapped only for the duration of the export and put
back in a ``finally`` (a deep copy would double the memory of a model that may barely fit), and a
dtype change works on a copy because it has to produce new tensors anyway.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from salr_edge.config import DEFAULT_GROUP_SIZE, VALUE_BITS, VALUE_FORMATS, _ConfigMixin
from salr_edge.formats.bitmap import BitmapTensor, bitmap_decode, quantize_bitmap
from salr_edge.io_utils import check_writable_parent
from salr_edge.modules.sparse_lowrank_linear import SparseLowRankLinear, iter_sparse_lowrank

from . import ops_schema
from .architectures import ArchitectureSpec, KVLayout, get_architecture, kv_layout
from .attention_layout import fold_attention_layout
from .fusion import fuse_shared_input_linears
from .quantized_head import quantized_head_replacements

logger = logging.getLogger(__name__)

METHODS = ("salr", "dense")
LM_HEADS = ("float", "int8", "int4")
# At opset 23 torch's exporter emits RMSNormalization, RotaryEmbedding and Attention (grouped-query; the
# exporter then hands it the KV cache, `attention_layout`) instead of ~40 elementwise/reshape nodes per layer,
# and ORT runs them as fused kernels (checked on ORT 1.32). A runtime without opset 23 needs `opset=18`.
DEFAULT_OPSET = 23
# Bumped whenever the exported graph changes for the same model and settings, so cached exports (the
# benchmark baselines) are rebuilt. 2: grouped K/V passed to Attention as they are (no repeated KV cache).
# 3: Attention takes 3-D q/k/v and appends the KV cache itself (`attention_layout`). 4: repeated nodes merged.
GRAPH_REVISION = 4
# transformers' SDPA attention repeats K and V to the query heads (an Expand of the whole KV cache in every
# layer, every step) unless this is set; then it calls SDPA with enable_gqa, which torch's exporter lowers to
# ONNX Attention with the grouped K/V. Same logits; SmolLM2 (3 KV heads for 9) dense fp32 decoded 2-3 ms a
# token faster on the 2-core CPU (the copies: ~35 MB per token at 256 tokens).
_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

# Dim names as onnxruntime-genai's model builder writes them.
BATCH_DIM = "batch_size"
SEQUENCE_DIM = "sequence_length"
PAST_DIM = "past_sequence_length"
TOTAL_DIM = "total_sequence_length"

# Name of the causal LM inside the wrapper; stripped from every exported name.
_WRAPPED = "lm"


@contextlib.contextmanager
def _grouped_kv_attention(enabled: bool) -> Iterator[None]:
    """Traces attention with grouped K/V (see _GQA_SWITCH) when `enabled` (opset >= 23, where the exporter emits
    ONNX Attention); the environment is restored afterwards."""
    if not enabled:
        yield
        return
    before = os.environ.get(_GQA_SWITCH)
    os.environ[_GQA_SWITCH] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_GQA_SWITCH, None)
        else:
            os.environ[_GQA_SWITCH] = before


@dataclass
class ExportConfig(_ConfigMixin):
    """How to export a causal LM to ONNX.

    Args:
        method: "salr" emits one `com.salr::SALRLinear` node per `SparseLowRankLinear`; "dense" exports
            plain MatMuls (a compressed model's adapters are merged into dense weights), the baseline.
        dtype: "fp32" or "fp16": the dtype of the whole model, activations included.
        values_dtype: dtype of the stored non-zeros, "fp16" (the main CPU case: half the bytes) or
            "fp32" (only with dtype "fp32").
        opset: default-domain ONNX opset (None: `DEFAULT_OPSET`; at least 18 with function bodies).
        function_fallback: append the standard-ONNX function bodies of the com.salr ops so the model
            also runs on an ONNX Runtime without the custom-op library.
        genai_config: write `genai_config.json` and the tokenizer files for onnxruntime-genai.
        copy_library: copy the built custom-op library next to the model and name it in
            genai_config.json (skipped, with a log line, when no library is built).
        check_model: run `onnx.checker.check_model` on the result before publishing it.
        adapter_dtype: dtype in which A_cat / B_cat are stored; None: the model's. "fp16" in an fp32 model
            halves the adapters' bytes on disk: a Cast in the graph (folded by ORT at load) feeds the op
            fp32 adapters, as the op contract asks.
        lm_head: "float" keeps the output projection in the model's dtype; "int8" / "int4" export it as ORT's
            `com.microsoft::MatMulNBits` with 8- / 4-bit weights (block 32, int8 activations) and a tied input
            embedding gathers from the same table (see `quantized_head`): 0.28x / 0.16x the fp32 bytes of the
            largest matrix of a small LM, read at that width for every token. Needs onnxruntime.
        values: how the sparse bases are stored. None: as each layer holds them (a quantized base becomes
            `com.salr::SALRLinearQ`, a float one `SALRLinear` with `values_dtype`). "float": every layer
            as float values (a quantized layer is refused). "int8"/"int4": every layer as `SALRLinearQ`
            with that many bits; a float base is quantized at export (plain round-to-nearest: no adapter
            absorbs the error, unlike `SALRConfig(values=...)`), a quantized base must already match.
            Needs method "salr".
        group_size: values per scale with integer `values`: of layers quantized at export (None: 32),
            and, when given, required of already quantized layers.
        fuse_linears: compressed layers that read the same activations (q/k/v, gate/up) become one
            `com.salr` node over their stacked weights and a Split (`fusion.fuse_shared_input_linears`):
            the same bytes with a third fewer op calls per token.
    """

    method: str = "salr"
    dtype: str = "fp32"
    values_dtype: str = "fp16"
    opset: int | None = None
    function_fallback: bool = True
    genai_config: bool = True
    copy_library: bool = True
    check_model: bool = True
    adapter_dtype: str | None = None
    lm_head: str = "float"
    values: str | None = None
    group_size: int | None = None
    fuse_linears: bool = True
    version: int = 1

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("dtype", "values_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {tuple(DTYPES)}, got {getattr(self, name)!r}")
        if self.dtype == "fp16" and self.values_dtype != "fp16":
            raise ValueError(f"values_dtype={self.values_dtype!r} needs dtype='fp32'; "
                             "fp16 models store fp16 values (the op allows float16 or the activations' type)")
        if self.opset is not None:
            if isinstance(self.opset, bool) or not isinstance(self.opset, int):
                raise TypeError(f"opset must be an integer or None, got {self.opset!r}")
            if self.opset < ops_schema.MIN_DEFAULT_OPSET:
                raise ValueError(f"opset must be >= {ops_schema.MIN_DEFAULT_OPSET} "
                                 f"(the com.salr function bodies need it), got {self.opset}")
        if self.adapter_dtype is not None and self.adapter_dtype not in DTYPES:
            raise ValueError(f"adapter_dtype must be None or one of {tuple(DTYPES)}, got {self.adapter_dtype!r}")
        if self.lm_head not in LM_HEADS:
            raise ValueError(f"lm_head must be one of {LM_HEADS}, got {self.lm_head!r}")
        if self.values is not None and self.values not in VALUE_FORMATS:
            raise ValueError(f"values must be None (as stored) or one of {VALUE_FORMATS}, got {self.values!r}")
        if self.bits is not None and self.method != "salr":
            raise ValueError(f"values={self.values!r} needs method 'salr': method {self.method!r} has no "
                             "quantized path (it exports dense float weights)")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size must be None or an integer >= 1, got {self.group_size!r}")
            if self.bits is None:
                raise ValueError(f"group_size applies only with values 'int8' or 'int4', got values={self.values!r}")
        for name in ("function_fallback", "genai_config", "copy_library", "check_model", "fuse_linears"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.version != self.VERSION:
            raise ValueError(f"ExportConfig version {self.version} is not supported "
                             f"(this library reads {self.VERSION})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_values_dtype(self) -> torch.dtype:
        return DTYPES[self.values_dtype]

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return DTYPES[self.adapter_dtype or self.dtype]

    @property
    def bits(self) -> int | None:
        """Bits asked of every layer's values (8 or 4), None for float or as-stored values."""
        return VALUE_BITS[self.values] if self.values is not None else None


@dataclass
class ExportResult:
    """What `export_onnx` wrote.

    Attributes:
        model_path: the `.onnx` file.
        files: every file written into the output folder (model, external data, genai files).
        num_salr_nodes: number of `com.salr::SALRLinear` and `SALRLinearQ` nodes.
        seconds: wall time of the export.
        num_compressed_layers: compressed layers exported; more than `num_salr_nodes` when
            `ExportConfig.fuse_linears` stacked layers that share an input into one node.
    """

    model_path: Path
    files: list[Path]
    num_salr_nodes: int
    seconds: float
    num_compressed_layers: int = 0


# ---- export-time modules -------------------------------------------------------------------------
class _SALRLinearExport(nn.Module):
    """Stands in for a `SparseLowRankLinear` during export: one `com.salr::SALRLinear` node, or
    `SALRLinearQ` when the base is quantized (bitmap format version 2).

    Holds exactly the op's inputs as buffers (they become initializers named
    ``<module>.weight.{bitmap,values,row_offsets}`` (+ ``<module>.weight.scales``), ``<module>.A_cat``,
    ``<module>.B_cat``, ``<module>.bias``). Outside an ONNX export its forward computes the op's contract
    in PyTorch from those same buffers, so a test can check them against the original module.

    Args:
        module: the layer.
        values_dtype: dtype of float values (unused for a quantized base).
        dtype: dtype of the adapters and bias (the activations').
        bitmap: the base to export; default: `module.to_bitmap(values_dtype)`.
    """

    def __init__(self, module: SparseLowRankLinear, values_dtype: torch.dtype, dtype: torch.dtype,
                 bitmap: BitmapTensor | None = None) -> None:
        super().__init__()
        if module.merged:
            raise ValueError("a SparseLowRankLinear has its adapters merged; call unmerge() before exporting")
        self.in_features = module.in_features
        self.out_features = module.out_features
        bitmap = module.to_bitmap(values_dtype) if bitmap is None else bitmap
        self.bits, self.group_size = bitmap.bits, bitmap.group_size
        # A child module named `weight` gives the buffers the names `<module>.weight.bitmap` etc.
        self.weight = nn.Module()
        self.weight.register_buffer("bitmap", bitmap.bitmap.contiguous())  # (N, ceil(K/8)) uint8
        self.weight.register_buffer("values", bitmap.values.contiguous())  # (nnz,) float/int8 | (ceil(nnz/2),) uint8
        self.weight.register_buffer("row_offsets", bitmap.row_offsets.contiguous())  # (N+1,) int64
        if bitmap.is_quantized:
            self.weight.register_buffer("scales", bitmap.scales.contiguous())  # (ceil(nnz/group_size),) float16
        with torch.no_grad():
            # Fold the scalings in fp32 before any cast to fp16.
            a_cat, b_cat = (t.detach().float() for t in module.fused_adapters())
        self.register_buffer("A_cat", a_cat.to(dtype).contiguous())  # (R, K)
        self.register_buffer("B_cat", b_cat.to(dtype).contiguous())  # (N, R)
        bias = module.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())  # (N,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            w = self.weight
            if self.bits is None:
                op, weights, attrs = ops_schema.SALR_LINEAR, (w.bitmap, w.values, w.row_offsets), {}
            else:
                op, weights = ops_schema.SALR_LINEAR_Q, (w.bitmap, w.values, w.row_offsets, w.scales)
                attrs = {ops_schema.BITS_ATTR: self.bits, ops_schema.GROUP_SIZE_ATTR: self.group_size}
            return torch.onnx.ops.symbolic(
                f"{ops_schema.SALR_DOMAIN}::{op}", (x, *weights, self.A_cat, self.B_cat, self.bias),
                {ops_schema.IN_FEATURES_ATTR: self.in_features, **attrs},
                dtype=x.dtype, shape=(*x.shape[:-1], self.out_features), version=ops_schema.SALR_OPSET_VERSION)
        w = bitmap_decode(self.stored_bitmap(), x.dtype)  # (N, K)
        y = x @ w.t() + (x @ self.A_cat.t()) @ self.B_cat.t()  # (..., N)
        return y if self.bias is None else y + self.bias

    def stored_bitmap(self) -> BitmapTensor:
        """The base as the node's initializers hold it."""
        return BitmapTensor(self.weight.bitmap, self.weight.values, self.weight.row_offsets,
                            (self.out_features, self.in_features), getattr(self.weight, "scales", None), self.bits,
                            self.group_size)

    def extra_repr(self) -> str:
        values = "float" if self.bits is None else f"int{self.bits}/g{self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.stored_bitmap().nnz}, values={values}, rank={self.A_cat.shape[0]}")


def _export_bitmap(name: str, module: SparseLowRankLinear, config: ExportConfig) -> BitmapTensor:
    """The base of layer `name` in the format `config.values` asks for (see `ExportConfig`).

    Raises:
        ValueError: a quantized layer with `values` "float", or with other bits or group size than asked.
    """
    if config.values is None:
        return module.to_bitmap(config.torch_values_dtype)
    if module.is_quantized:
        stored = f"layer {name!r} stores int{module.bits} values (group_size {module.group_size})"
        if config.bits is None:
            raise ValueError(f"{stored}; values='float' would need them dequantized: export with values=None "
                             f"(as stored) or values='int{module.bits}'")
        if config.bits != module.bits or config.group_size not in (None, module.group_size):
            raise ValueError(f"{stored}, not the values={config.values!r}, group_size={config.group_size} asked "
                             "for; quantized values are never quantized again")
        return module.to_bitmap()
    if config.bits is None:
        return module.to_bitmap(config.torch_values_dtype)
    # from the float32 base, not from values already rounded to values_dtype
    return quantize_bitmap(module.to_bitmap(torch.float32), config.bits, config.group_size or DEFAULT_GROUP_SIZE)


def _dense_linear(module: SparseLowRankLinear, dtype: torch.dtype) -> nn.Linear:
    """A plain `nn.Linear` with the adapters merged into the (no longer sparse) weight."""
    with torch.no_grad():
        weight = module.sparse_weight().float() + module.get_delta_weight().float()  # (N, K)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


class _DecoderWrapper(nn.Module):
    """Flat ONNX-friendly signature around a causal LM: (ids, mask, positions, past) -> (logits, present).

    Args:
        lm: the causal LM (registered as `lm`; that prefix is stripped from exported names).
        num_layers: number of decoder layers (pairs of past/present tensors).
    """

    def __init__(self, lm: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.lm = lm
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # No config: plain full-length layers, whatever sliding window the config names. The mask
        # still applies the window; the cache must not crop what the runtime hands back next step.
        cache = DynamicCache()
        for layer, (key, value) in enumerate(past_key_values):  # each (B, kv_heads, past, head_dim)
            cache.update(key, value, layer)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:  # each (B, kv_heads, past + seq, head_dim)
            present += [layer.keys, layer.values]
        return (out.logits, *present)  # logits (B, seq, vocab)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The exported model's input and output names, in order."""
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    outputs = [LOGITS]
    for i in range(num_layers):
        inputs += [PAST_KEY % i, PAST_VALUE % i]
        outputs += [PRESENT_KEY % i, PRESENT_VALUE % i]
    return inputs, outputs


def _example_inputs(layout: KVLayout, vocab_size: int, dtype: torch.dtype) -> tuple:
    """Example inputs whose dims all differ, so the tracer cannot mistake one dynamic dim for another."""
    batch, seq, past = 2, 3, 5
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)  # (B, S)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)  # (B, P+S)
    position_ids = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()  # (B, S)
    kv_shape = (batch, layout.num_kv_heads, past, layout.head_dim)
    past_kv = tuple((torch.randn(kv_shape, generator=gen).to(dtype), torch.randn(kv_shape, generator=gen).to(dtype))
                    for _ in range(layout.num_layers))
    return input_ids, attention_mask, position_ids, past_kv


def _dynamic_shapes(num_layers: int) -> dict[str, Any]:
    from torch.export import Dim

    batch, seq = Dim(BATCH_DIM), Dim(SEQUENCE_DIM)
    past, total = Dim(PAST_DIM), Dim(TOTAL_DIM)
    kv = {0: batch, 2: past}
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": tuple((dict(kv), dict(kv)) for _ in range(num_layers)),
    }


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Put `replacements` in place of the named submodules, and the originals back afterwards."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            originals[name] = getattr(parent, child)
            setattr(parent, child, new)
        yield
    finally:
        for name, old in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, old)


def _replacement_modules(model: nn.Module, config: ExportConfig) -> dict[str, nn.Module]:
    layers = list(iter_sparse_lowrank(model))
    if config.method == "salr" and not layers:
        raise ValueError("method 'salr' needs a compressed model (no SparseLowRankLinear layers found): "
                         "run salr_edge.compress_ first, or export with method 'dense'")
    replacements: dict[str, nn.Module] = {}
    if config.lm_head != "float":
        replacements.update(quantized_head_replacements(model, config.torch_dtype, config.lm_head))
    if config.bits is not None:
        floats = [name for name, module in layers if not module.is_quantized]
        if floats:
            logger.warning("quantizing %d float layers to %s at export: plain rounding, no adapter absorbs its "
                           "error (SALRConfig(values=%r) compresses error-aware)", len(floats), config.values,
                           config.values)
    for name, module in tqdm(layers, desc=f"prepare {config.method} layers", disable=len(layers) < 50,
                             leave=False):
        if config.method == "salr":
            replacements[name] = _SALRLinearExport(module, config.torch_values_dtype, config.torch_dtype,
                                                   _export_bitmap(name, module, config))
        else:
            replacements[name] = _dense_linear(module, config.torch_dtype)
    return replacements


@contextlib.contextmanager
def _export_view(model: nn.Module, config: ExportConfig) -> Iterator[nn.Module]:
    """The model as it should be traced: right dtype, export modules in, eval mode; the caller's untouched."""
    model_dtype = next(model.parameters()).dtype
    target = model
    if model_dtype != config.torch_dtype:
        logger.info("converting a copy of the model from %s to %s", model_dtype, config.torch_dtype)
        target = copy.deepcopy(model)
        # Replacement modules are built from the original precision (adapter scales folded in fp32).
        replacements = _replacement_modules(model, config)
        target.to(config.torch_dtype)
        # Rotary frequencies keep fp32: an fp16 inv_freq shifts every angle (transformers computes
        # the rotary tables in fp32 and casts the result).
        originals = dict(model.named_buffers())
        for name, buf in target.named_buffers():
            if name.endswith("inv_freq") and name in originals:
                buf.data = originals[name].detach().float().clone()
    else:
        replacements = _replacement_modules(model, config)
    was_training = target.training
    target.eval()
    try:
        with _swapped(target, replacements):
            yield target
    finally:
        target.train(was_training)


# ---- post-processing of the exported IR ----------------------------------------------------------
def _module_path(node) -> str | None:
    """The module a node was traced in, relative to the causal LM ('' for top level); None if unknown."""
    namespace = node.metadata_props.get("namespace")
    if not namespace:
        return None
    segments = namespace.split("/")
    if len(segments) < 2:
        return ""
    fqn = segments[-2].split(":", 1)[0].strip()  # each segment is "<fqn>: <class>", the last one the op
    if fqn == _WRAPPED:
        return ""
    if fqn.startswith(_WRAPPED + "."):
        return fqn[len(_WRAPPED) + 1:]
    return ""


def _path_segments(fqn: str) -> list[str]:
    """'model.layers.3.mlp.down_proj' -> ['model', 'layers.3', 'mlp', 'down_proj']."""
    segments: list[str] = []
    for part in fqn.split(".") if fqn else []:
        if part.isdigit() and segments:
            segments[-1] += f".{part}"
        else:
            segments.append(part)
    return segments


def _rename(ir_model) -> None:
    """Hierarchical node names, `{node}/output_{k}` value names, initializers named after their module."""
    graph = ir_model.graph
    graph_outputs = {id(v) for v in graph.outputs}
    seen: Counter[str] = Counter()
    for node in graph:
        path = _module_path(node)
        if path is None:
            continue
        base = "/" + "/".join([*_path_segments(path), node.op_type])
        name = base if seen[base] == 0 else f"{base}_{seen[base]}"
        seen[base] += 1
        node.name = name
    for node in graph:
        for k, value in enumerate(node.outputs):
            if id(value) not in graph_outputs and not value.is_initializer():
                value.name = f"{node.name}/output_{k}"
    renames: dict[str, str] = {}
    taken = set(graph.initializers)
    for name, value in list(graph.initializers.items()):
        new = None
        if name.startswith(_WRAPPED + "."):
            new = name[len(_WRAPPED) + 1:]
        else:
            # The exporter folds `weight.T` of each dense linear into a fresh constant ("val_12").
            users = list(value.uses())
            if len(users) == 1 and users[0].node.op_type in ("MatMul", "Gemm") and users[0].idx == 1:
                path = _module_path(users[0].node)
                if path:
                    new = f"{path}.weight_transposed"
        if new and new not in taken:
            renames[name] = new
            taken.add(new)
    for old, new in renames.items():
        value = graph.initializers.pop(old)
        value.name = new
        graph.initializers[new] = value


def _gemm_reading(graph, node, w) -> None:
    """Replace `MatMul(X, Wᵀ)` (`node`) by a Gemm that reads W [N, K] itself.

    ::

        X (..., K) ─ Reshape (-1, K) ─ Gemm(transB=1) ◄─ W (N, K) ─ Reshape (..., N) ─► Y

    Gemm is 2-D only, hence the reshapes; ORT's Gemm reads W transposed without copying it.
    """
    import numpy as np
    import onnx_ir as ir

    x = node.inputs[0]
    n, k = w.shape
    meta = dict(node.metadata_props)
    flat_shape = ir.node("Constant", [], {"value": ir.tensor(np.array([-1, k], dtype=np.int64))}, metadata_props=meta)
    x2 = ir.node("Reshape", [x, flat_shape.outputs[0]], metadata_props=meta)  # (M, K)
    y2 = ir.node("Gemm", [x2.outputs[0], w], {"transB": 1}, metadata_props=meta)  # (M, N)
    lead = ir.node("Shape", [x], {"start": 0, "end": -1}, metadata_props=meta)
    n_dim = ir.node("Constant", [], {"value": ir.tensor(np.array([n], dtype=np.int64))}, metadata_props=meta)
    y_shape = ir.node("Concat", [lead.outputs[0], n_dim.outputs[0]], {"axis": 0}, metadata_props=meta)
    y = ir.node("Reshape", [y2.outputs[0], y_shape.outputs[0]], metadata_props=meta)  # (..., N)
    y.outputs[0].dtype, y.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], [flat_shape, x2, y2, lead, n_dim, y_shape, y],
                                            [node.outputs[0]], [y.outputs[0]])


def _transposed_source(graph, b, by_shape: dict) -> tuple[object, object]:
    """(W, Transpose node or None) when the MatMul weight `b` is Wᵀ of an initializer W [N, K], else (None, None).

    Two shapes reach here: small weights the exporter already folded into a fresh constant (find
    the initializer it is the transpose of), and large ones it leaves as a Transpose node.
    """
    import numpy as np

    producer = b.producer()
    if producer is not None:
        if producer.op_type != "Transpose" or producer.domain != "":
            return None, None
        source = producer.inputs[0]
        perm = producer.attributes.get("perm")
        if (source is None or not source.is_initializer() or source.shape is None or len(source.shape) != 2
                or (perm is not None and list(perm.as_ints()) != [1, 0])):
            return None, None
        return source, producer
    if not b.is_initializer() or b.const_value is None or b.shape is None or len(b.shape) != 2:
        return None, None
    k, n = b.shape
    b_array = None
    for w in by_shape.get(((n, k), b.dtype), []):
        if w is b:
            continue
        if b_array is None:
            b_array = b.const_value.numpy()  # (K, N)
        w_array = w.const_value.numpy()  # (N, K)
        # one row first: a dense model has dozens of same-shaped weights that differ at once
        if np.array_equal(w_array[0], b_array[:, 0]) and np.array_equal(w_array.T, b_array):
            return w, None
    return None, None


def _resolve_weight_transposes(ir_model) -> tuple[int, int]:
    """Leave no transposed copy of a weight, on disk or at run time.

    The exporter turns `x @ W.T` into MatMul(x, Wᵀ): small Wᵀ folded into a new constant, large ones
    left as a Transpose node. Both cost: a tied output embedding (SmolLM2: lm_head = embed_tokens,
    113 MB in fp32) is stored twice, or transposed on every step when ORT's ConstantFolding is off
    (the com.salr function-body sessions), or twice in memory when it is on. So:

    - W also used elsewhere (tied): the MatMul becomes a Gemm reading W itself (`_gemm_reading`);
    - W used only here: Wᵀ is folded now, as ORT would at load, so no session depends on folding.

    Returns:
        (MatMuls rewritten to read a shared W, Transpose nodes folded).
    """
    import numpy as np
    import onnx_ir as ir

    graph = ir_model.graph
    by_shape: dict[tuple, list] = {}
    for value in graph.initializers.values():
        if value.const_value is not None and value.shape is not None and len(value.shape) == 2:
            by_shape.setdefault((tuple(value.shape), value.dtype), []).append(value)
    shared = folded = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2 or node.inputs[1] is None:
            continue
        b = node.inputs[1]
        w, transpose = _transposed_source(graph, b, by_shape)
        if w is None:
            continue
        other_users = [u for u in w.uses() if u.node is not transpose]
        if transpose is None or other_users:
            _gemm_reading(graph, node, w)
            shared += 1
        else:
            w_t = ir.Value(name=f"{w.name}_transposed", shape=ir.Shape(list(reversed(w.shape))), type=w.type,
                           const_value=ir.tensor(np.ascontiguousarray(w.const_value.numpy().T)))  # (K, N)
            graph.register_initializer(w_t)
            node.replace_input_with(1, w_t)
            folded += 1
        if transpose is not None and not transpose.outputs[0].uses():
            graph.remove(transpose, safe=True)
        for value in (b, w):
            if value.is_initializer() and not value.uses() and value.name in graph.initializers:
                graph.initializers.pop(value.name)
    return shared, folded


def _narrow_adapters(ir_model, dtype: torch.dtype) -> int:
    """Store every SALRLinear(Q)'s A_cat / B_cat in `dtype`, cast back to the activations' type in the graph.

    Done on the IR because the exporter's optimizer folds a traced Cast of a buffer into a new full-width
    constant. ORT folds the Cast once at session load, so the kernel still reads constant adapters.

    Returns:
        Number of adapter tensors narrowed.
    """
    import onnx_ir as ir

    target = {torch.float16: ir.DataType.FLOAT16, torch.float32: ir.DataType.FLOAT}[dtype]
    graph = ir_model.graph
    narrowed = 0
    for node in list(graph):
        if node.op_type not in ops_schema.LINEAR_OPS or node.domain != ops_schema.SALR_DOMAIN:
            continue
        for index in ops_schema.ADAPTER_INPUTS[node.op_type]:
            value = node.inputs[index]
            if (value is None or not value.is_initializer() or value.const_value is None or value.dtype == target
                    or len(list(value.uses())) != 1):
                continue
            wide = value.dtype
            narrow = ir.Value(name=value.name, shape=value.shape, type=ir.TensorType(target),
                              const_value=ir.tensor(value.const_value.numpy().astype(target.numpy())))
            graph.initializers.pop(value.name)
            graph.register_initializer(narrow)
            cast = ir.node("Cast", [narrow], {"to": wide}, name=f"{node.name}/Cast_{index}")
            cast.outputs[0].name = f"{value.name}/cast"
            cast.outputs[0].dtype, cast.outputs[0].shape = wide, value.shape
            graph.insert_before(node, cast)
            node.replace_input_with(index, cast.outputs[0])
            narrowed += 1
    return narrowed


def _add_functions(ir_model, used_ops: set[str]) -> None:
    """Append the model-local function bodies of the com.salr ops the graph uses."""
    import onnx_ir as ir

    default_opset = ir_model.opset_imports.get("", None)
    if default_opset is None:
        raise RuntimeError("the exported model imports no default ONNX opset")
    for proto in ops_schema.function_protos(default_opset, sorted(used_ops)):
        function = ir.serde.deserialize_function(proto)
        ir_model.functions[function.identifier()] = function


def _merge_repeated_nodes(ir_model) -> None:
    """One node for each computation the trace repeats on the same inputs.

    transformers computes the rotary cos/sin inside every attention layer, so the trace holds 2 Cos + 2 Sin
    per layer of one shared angle tensor (SmolLM2: 118 redundant nodes run every step).
    """
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass

    before = len(ir_model.graph)
    CommonSubexpressionEliminationPass()(ir_model)
    RemoveUnusedNodesPass()(ir_model)
    logger.info("repeated computations merged: %d nodes fewer", before - len(ir_model.graph))


def _count_salr_nodes(ir_model) -> int:
    return sum(1 for node in ir_model.graph if node.op_type in ops_schema.LINEAR_OPS
               and node.domain == ops_schema.SALR_DOMAIN)


def _salr_ops_used(ir_model) -> set[str]:
    return {node.op_type for node in ir_model.graph if node.domain == ops_schema.SALR_DOMAIN}


# ---- the entry point -----------------------------------------------------------------------------
def _library_for_copy() -> Path | None:
    from salr_edge.runtime import library_path

    try:
        return Path(library_path())
    except FileNotFoundError as exc:
        logger.info("not copying the custom-op library: %s", exc)
        return None


def export_onnx(model: nn.Module, output_path: str | os.PathLike, config: ExportConfig | None = None,
                tokenizer=None) -> ExportResult:
    """Export a causal LM (compressed or not) as one ONNX decoder with a KV cache.

    Writes ``OUTPUT.onnx`` and its weights ``OUTPUT.onnx.data`` and, with `config.genai_config`,
    ``genai_config.json``, the tokenizer files (when `tokenizer` is given) and a copy of the custom-op
    library next to them. All files appear at the end, by rename; on error nothing is left.

    Inputs: ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, past+seq],
    ``position_ids`` int64 [batch, seq], ``past_key_values.{i}.key/value`` [batch, kv_heads, past,
    head_dim]. Outputs: ``logits`` [batch, seq, vocab], ``present.{i}.key/value`` [batch, kv_heads,
    past+seq, head_dim].

    Args:
        model: a transformers causal LM of a registered architecture; not modified.
        output_path: the `.onnx` file to write; its folder must exist and be writable.
        config: export options (default `ExportConfig()`).
        tokenizer: saved next to the model for onnxruntime-genai.

    Returns:
        What was written.

    Raises:
        UnsupportedArchitectureError: the model's architecture is not in the registry.
        ValueError: bad options, or method 'salr' on an uncompressed model.
        FileNotFoundError, PermissionError: the output folder is missing or not writable.
    """
    import onnx

    config = config or ExportConfig()
    start = time.perf_counter()
    spec: ArchitectureSpec = get_architecture(model.config)
    layout = kv_layout(model.config)
    output_path = check_writable_parent(output_path)
    if output_path.is_dir():
        raise IsADirectoryError(f"output {output_path} is a directory; give the .onnx file to write")
    ops_schema.register_schemas()
    input_names, output_names = io_names(layout.num_layers)

    out_dir = output_path.resolve().parent
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", suffix=".tmp", dir=out_dir))
    try:
        with _export_view(model, config) as target:
            wrapper = _DecoderWrapper(target, layout.num_layers).eval()
            args = _example_inputs(layout, int(model.config.vocab_size), config.torch_dtype)
            logger.info("tracing %s (%s, %s) with torch.onnx.export(dynamo=True)", spec.model_type,
                        config.method, config.dtype)
            t0 = time.perf_counter()
            opset = config.opset or DEFAULT_OPSET
            with warnings.catch_warnings(), _grouped_kv_attention(opset >= 23):
                # Expected and harmless: each dynamic dim is named once per input that carries it.
                warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape")
                warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
                program = torch.onnx.export(
                    wrapper, args, dynamo=True, dynamic_shapes=_dynamic_shapes(layout.num_layers),
                    input_names=input_names, output_names=output_names,
                    opset_version=opset,
                    optimize=True, verbose=False)
            logger.info("traced in %.1f s", time.perf_counter() - t0)
        ir_model = program.model
        used = _salr_ops_used(ir_model)
        shared, folded = _resolve_weight_transposes(ir_model)
        logger.info("weights transposed at export: %d folded, %d read in place from a tied tensor", folded, shared)
        _rename(ir_model)
        num_layers = _count_salr_nodes(ir_model)
        if config.method == "salr" and config.torch_adapter_dtype != config.torch_dtype:
            logger.info("adapters stored in %s: %d tensors", config.adapter_dtype, _narrow_adapters(ir_model,
                        config.torch_adapter_dtype))
        if config.fuse_linears:
            fused_layers, fused_nodes = fuse_shared_input_linears(ir_model)
            logger.info("%d layers that share an input fused into %d nodes", fused_layers, fused_nodes)
        logger.info("attention blocks given 3-D projections and the KV cache: %d", fold_attention_layout(ir_model))
        _merge_repeated_nodes(ir_model)
        for node in ir_model.graph:
            # The tracer's per-node provenance (module stack, FX node text) is now in the node names;
            # kept, it is most of the graph file (SmolLM2: ~4 of 5 MB).
            node.metadata_props.clear()
        if used and config.function_fallback:
            _add_functions(ir_model, used)
        num_salr = _count_salr_nodes(ir_model)
        ir_model.producer_name = "salr-edge"
        ir_model.metadata_props.update({"salr_edge.method": config.method, "salr_edge.dtype": config.dtype,
                                        "salr_edge.export_config": json.dumps(config.to_dict(), sort_keys=True)})
        staged_model = staging / output_path.name
        data_name = f"{output_path.name}.data"
        logger.info("saving %s with external data %s", output_path.name, data_name)
        import onnx_ir as ir

        ir.save(ir_model, staged_model, external_data=data_name)
        del program, ir_model
        if config.check_model:
            onnx.checker.check_model(str(staged_model))
        found = _library_for_copy() if used else None
        library = found if config.copy_library else None
        if used and not config.function_fallback and found is None:
            logger.warning("%s has no function bodies and no custom-op library was found: it will only run "
                           "where libsalr_ops.so is registered", output_path.name)
        if config.genai_config:
            from .genai_config import write_genai_files

            write_genai_files(staging, model.config, spec, layout, model_filename=output_path.name,
                              tokenizer=tokenizer, library=library,
                              generation_config=getattr(model, "generation_config", None),
                              vanilla_fallback=bool(used) and library is None)
        files = _publish(staging, out_dir, first=data_name, last=output_path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    logger.info("exported %s (%d compressed layers in %d SALRLinear/SALRLinearQ nodes) in %.1f s", output_path,
                num_layers, num_salr, seconds)
    return ExportResult(model_path=output_path, files=files, num_salr_nodes=num_salr, seconds=seconds,
                        num_compressed_layers=num_layers)


def _publish(staging: Path, out_dir: Path, first: str, last: str) -> list[Path]:
    """Rename every staged file into `out_dir`: the weights first, the model file last.

    A reader that sees the new `.onnx` therefore always finds its new weights next to it.
    """
    items = sorted(staging.iterdir(), key=lambda p: (p.name != first, p.name == last, p.name))
    published = []
    for item in items:
        target = out_dir / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
        published.append(target)
    return published
