"""Fixtures of the exporter tests: tiny compressed Llama/Qwen2 models and their exports, made once.

Every export takes ~10-15 s on 2 cores, so each (architecture, method, dtype) is exported once per
session and shared; tests that need a fresh export (CLI, errors) make their own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _map_export_package() -> None:
    """Make `salr_edge.export` importable from a source checkout that is not pip-installed.

    An install maps `export/` to `salr_edge.export` (setuptools package-dir); with only the repo on
    `sys.path`, do the same mapping here so the tests run either way.
    """
    try:
        importlib.import_module("salr_edge.export")
        return
    except ModuleNotFoundError:
        pass
    import salr_edge

    spec = importlib.util.spec_from_file_location("salr_edge.export", REPO / "export" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "export")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["salr_edge.export"] = module
    spec.loader.exec_module(module)
    salr_edge.export = module


_map_export_package()

ARCHITECTURES = ("llama", "qwen2")
VOCAB = 128


def tiny_config(arch: str):
    """A 2-layer, hidden-64 random config; Qwen2 has q/k/v biases, Llama none, so both bias paths run."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, **common)
    raise ValueError(arch)


def make_tiny_model(arch: str, compress: bool = True, **salr_options):
    """A tiny random causal LM, SALR-compressed with non-zero LoRA B (rule 13) unless `compress` is False.

    The kept base weights are rounded to fp16 so the default fp16 `values` store them exactly: the
    exported model then computes the very function of the PyTorch model and fp32 logits can be
    compared at 1e-4. Quantized bases (`salr_options` such as values="int4") are left as they are: their
    weights are already exactly what the exported integers and scales decode to.

    Args:
        salr_options: more `SALRConfig` fields (values, group_size, granularity, ...).
    """
    from transformers import AutoModelForCausalLM

    from salr_edge.api import compress_
    from salr_edge.config import SALRConfig
    from salr_edge.modules.sparse_lowrank_linear import iter_sparse_lowrank

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    # Random tiny models emit every token sooner or later; no stop token keeps generations full length.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if not compress:
        return model
    compress_(model, SALRConfig(sparsity=0.5, rank=4, lora_rank=4, **salr_options), show_progress=False)
    with torch.no_grad():
        for _, module in iter_sparse_lowrank(model):
            module.salr_B["lora"].normal_(0, 0.05)
            if module.bias is not None:  # transformers initialises biases to 0, which hides a wrong bias
                module.bias.normal_(0, 0.1)
            if not module.is_quantized:
                module.base_layer.weight.copy_(module.base_layer.weight.half().float())
    return model


def make_tiny_tokenizer():
    """A word-level fast tokenizer over VOCAB tokens, built offline (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def find_library() -> str | None:
    """The built custom-op library, or None (tests needing it skip)."""
    from salr_edge.runtime import library_path

    try:
        return library_path()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="session")
def salr_lib() -> str:
    path = find_library()
    if path is None:
        pytest.skip("libsalr_ops.so is not built: `pip install -e .`, or build custom_ops/ with CMake and set "
                    "SALR_OPS_LIBRARY")
    return path


class Exported:
    """A tiny model and its export: `model` (PyTorch), `path` (.onnx), `dir` (output folder)."""

    def __init__(self, model, path: Path) -> None:
        self.model = model
        self.path = path
        self.dir = path.parent


_CACHE: dict[tuple, Exported] = {}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(arch, method="salr", dtype="fp32") -> Exported, cached for the session."""
    from salr_edge.export import ExportConfig, export_onnx

    def get(arch: str, method: str = "salr", dtype: str = "fp32") -> Exported:
        key = (arch, method, dtype)
        if key not in _CACHE:
            model = make_tiny_model(arch, compress=True)
            out = tmp_path_factory.mktemp(f"{arch}_{method}_{dtype}") / "model.onnx"
            export_onnx(model, out, ExportConfig(method=method, dtype=dtype), tokenizer=make_tiny_tokenizer())
            _CACHE[key] = Exported(model, out)
        return _CACHE[key]

    return get


@pytest.fixture
def no_library(monkeypatch):
    """Sessions made by `salr_edge.runtime` find no library (neither built nor beside the model).

    Only session creation is affected: exports made meanwhile (the session-cached ones) still copy
    the library when it is built, so test order does not change what the export folders hold.
    """
    import salr_edge.runtime as runtime

    monkeypatch.setattr(runtime, "_find_library", lambda model_path: None)
