"""genai_config.json: content, a relative library path, and onnxruntime-genai running the export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from salr_edge.export.architectures import get_architecture, kv_layout
from salr_edge.export.genai_config import (
    CONSTANT_FOLDING,
    DISABLE_OPTIMIZERS_KEY,
    LIBRARY_FILE_NAME,
    make_genai_config,
)
from salr_edge.runtime import generate, make_session

from .conftest import find_library, tiny_config


def _config(**kwargs):
    cfg = tiny_config("llama")
    return make_genai_config(cfg, get_architecture(cfg), kv_layout(cfg), "model.onnx", **kwargs)


def test_genai_config_content():
    config = _config(custom_ops_library=LIBRARY_FILE_NAME)
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama" and config["model"]["vocab_size"] == 128
    assert config["model"]["context_length"] == 256 and config["search"]["max_length"] == 256
    assert (decoder["head_size"], decoder["hidden_size"]) == (16, 64)
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (4, 2, 2)
    assert decoder["filename"] == "model.onnx"
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert decoder["session_options"]["custom_ops_library"] == "libsalr_ops.so"
    assert DISABLE_OPTIMIZERS_KEY not in decoder["session_options"]
    assert config["search"]["past_present_share_buffer"] is False
    assert (config["model"]["bos_token_id"], config["model"]["eos_token_id"]) == (1, 2)


def test_vanilla_fallback_asks_ort_not_to_fold_the_weights():
    options = _config(vanilla_fallback=True)["model"]["decoder"]["session_options"]
    assert "custom_ops_library" not in options
    assert options[DISABLE_OPTIMIZERS_KEY] == CONSTANT_FOLDING


@pytest.mark.parametrize("path", ["../libsalr_ops.so", "/abs/libsalr_ops.so", "lib/../../x.so"])
def test_library_path_must_stay_inside_the_model_folder(path):
    with pytest.raises(ValueError, match="inside the model folder"):
        _config(custom_ops_library=path)


def test_exported_folder_holds_genai_files(exported):
    e = exported("llama")
    config = json.loads((e.dir / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert (e.dir / "tokenizer.json").is_file()
    options = config["model"]["decoder"]["session_options"]
    if find_library() is not None:
        assert options["custom_ops_library"] == LIBRARY_FILE_NAME
        assert (e.dir / LIBRARY_FILE_NAME).is_file()
    else:
        assert "custom_ops_library" not in options and options[DISABLE_OPTIMIZERS_KEY] == CONSTANT_FOLDING
    dense = json.loads((exported("qwen2", method="dense").dir / "genai_config.json").read_text())
    assert dense["model"]["type"] == "qwen2"
    dense_options = dense["model"]["decoder"]["session_options"]
    assert "custom_ops_library" not in dense_options and DISABLE_OPTIMIZERS_KEY not in dense_options


def _genai_greedy(folder, prompt, new_tokens):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return np.array(generator.get_sequence(0))


def test_onnxruntime_genai_generates_what_ort_generates(exported):
    pytest.importorskip("onnxruntime_genai")
    e = exported("llama")
    prompt = np.array([[5, 17, 99, 3, 42, 8]], dtype=np.int64)
    expected = generate(make_session(e.path), input_ids=prompt, max_new_tokens=32)[0]
    np.testing.assert_array_equal(_genai_greedy(e.dir, prompt, 32), expected)


def test_onnxruntime_genai_loads_the_library_from_genai_config(exported, salr_lib, tmp_path):
    """Without function bodies the model only runs if genai really registered the library copy."""
    pytest.importorskip("onnxruntime_genai")
    e = exported("llama")
    folder = tmp_path / "bare"
    shutil.copytree(e.dir, folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    del model.functions[:]
    onnx.save(model, str(folder / "model.onnx"))
    prompt = np.array([[5, 17, 99, 3]], dtype=np.int64)
    expected = generate(make_session(e.path), input_ids=prompt, max_new_tokens=16)[0]
    np.testing.assert_array_equal(_genai_greedy(folder, prompt, 16), expected)
