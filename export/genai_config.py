"""`genai_config.json` for onnxruntime-genai, plus the files it expects next to the model.

The layout follows what onnxruntime-genai's own model builder writes for decoder-only models
(`model.decoder.{inputs,outputs}` name templates, `search` defaults from the generation config).
When the model uses com.salr ops and the custom-op library is built, a copy of the library goes into
the model folder and `session_options.custom_ops_library` names it by a bare file name: genai refuses
paths with `..` and paths outside the model folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .architectures import ArchitectureSpec, KVLayout

logger = logging.getLogger(__name__)

GENAI_CONFIG_NAME = "genai_config.json"
LIBRARY_FILE_NAME = "libsalr_ops.so"

# ORT session config entry that keeps the com.salr function bodies from being constant-folded into
# dense fp32 weights when no library is registered (see salr_edge.runtime.make_session).
DISABLE_OPTIMIZERS_KEY = "optimization.disable_specified_optimizers"
CONSTANT_FOLDING = "ConstantFolding"


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _token_ids(hf_config, generation_config) -> tuple[Any, Any, Any]:
    """(bos, eos, pad): the generation config wins over config.json (chat models end turns differently)."""
    bos = _first(getattr(generation_config, "bos_token_id", None), getattr(hf_config, "bos_token_id", None))
    eos = _first(getattr(generation_config, "eos_token_id", None), getattr(hf_config, "eos_token_id", None))
    pad = _first(getattr(generation_config, "pad_token_id", None), getattr(hf_config, "pad_token_id", None))
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return bos, eos, pad


def make_genai_config(hf_config, spec: ArchitectureSpec, layout: KVLayout, model_filename: str,
                      custom_ops_library: str | None = None, generation_config=None,
                      vanilla_fallback: bool = False) -> dict[str, Any]:
    """The genai_config.json content for an exported decoder.

    Args:
        hf_config: the transformers config of the model.
        spec: its architecture entry.
        layout: its KV-cache layout.
        model_filename: the `.onnx` file name (in the same folder).
        custom_ops_library: file name of the library copy in the model folder, or None.
        generation_config: transformers `GenerationConfig` whose search settings and token ids win.
        vanilla_fallback: the model needs its com.salr function bodies (no library): ask ORT not to
            constant-fold them.

    Returns:
        A JSON-serialisable dict.
    """
    library = Path(custom_ops_library) if custom_ops_library is not None else None
    if library is not None and (library.is_absolute() or ".." in library.parts):
        raise ValueError(f"custom_ops_library must be a path inside the model folder, got {custom_ops_library!r}")
    bos, eos, pad = _token_ids(hf_config, generation_config)
    gen = generation_config
    context_length = int(getattr(hf_config, "max_position_embeddings", 2048))
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom_ops_library is not None:
        session_options["custom_ops_library"] = custom_ops_library
    if vanilla_fallback:
        session_options[DISABLE_OPTIMIZERS_KEY] = CONSTANT_FOLDING
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context_length,
            "decoder": {
                "session_options": session_options,
                "filename": model_filename,
                "head_size": layout.head_dim,
                "hidden_size": layout.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": layout.num_attention_heads,
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": spec.genai_type,
            "vocab_size": int(hf_config.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(getattr(gen, "do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # present is a fresh (past + seq) tensor, not a view of a preallocated buffer
            "past_present_share_buffer": False,
            "repetition_penalty": float(_first(getattr(gen, "repetition_penalty", None), 1.0)),
            "temperature": float(_first(getattr(gen, "temperature", None), 1.0)),
            "top_k": int(_first(getattr(gen, "top_k", None), 50)),
            "top_p": float(_first(getattr(gen, "top_p", None), 1.0)),
        },
    }


def write_genai_files(directory: Path, hf_config, spec: ArchitectureSpec, layout: KVLayout, model_filename: str,
                      tokenizer=None, library: Path | None = None, generation_config=None,
                      vanilla_fallback: bool = False) -> list[Path]:
    """Write genai_config.json, the tokenizer files and the library copy into `directory`.

    Returns:
        The files written.
    """
    directory = Path(directory)
    written: list[Path] = []
    library_name = None
    if library is not None:
        target = directory / LIBRARY_FILE_NAME
        shutil.copy2(library, target)
        written.append(target)
        library_name = LIBRARY_FILE_NAME
    config = make_genai_config(hf_config, spec, layout, model_filename, custom_ops_library=library_name,
                               generation_config=generation_config, vanilla_fallback=vanilla_fallback)
    path = directory / GENAI_CONFIG_NAME
    path.write_text(json.dumps(config, indent=4) + "\n")
    written.append(path)
    if tokenizer is not None:
        written += [Path(p) for p in tokenizer.save_pretrained(str(directory))]
    logger.info("wrote %s%s", GENAI_CONFIG_NAME, f" (custom_ops_library={library_name})" if library_name else "")
    return written
