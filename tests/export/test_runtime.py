"""`salr_edge.runtime`: sessions with or without the library, generation arguments, `salr generate`."""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import onnx
import pytest

from salr_edge import runtime
from salr_edge.export import ops_schema
from salr_edge.runtime import LibraryRequiredError, generate, make_session

ort = pytest.importorskip("onnxruntime")


def _copy_model(src_dir, dst_dir, strip_functions: bool = False):
    """model.onnx + its data in a folder of their own (no library copy beside them)."""
    dst_dir.mkdir()
    shutil.copy2(src_dir / "model.onnx.data", dst_dir / "model.onnx.data")
    model = onnx.load(str(src_dir / "model.onnx"), load_external_data=False)
    if strip_functions:
        del model.functions[:]
    onnx.save(model, str(dst_dir / "model.onnx"))
    return dst_dir / "model.onnx"


def test_salr_domain_constant_matches_the_exporter():
    assert runtime.SALR_DOMAIN == ops_schema.SALR_DOMAIN


def test_model_salr_info(exported, tmp_path):
    e = exported("llama")
    assert runtime.model_salr_info(e.path) == (True, True)
    stripped = _copy_model(e.dir, tmp_path / "bare", strip_functions=True)
    assert runtime.model_salr_info(stripped) == (True, False)
    assert runtime.model_salr_info(exported("qwen2", method="dense").path) == (False, False)


def test_vanilla_session_disables_constant_folding(exported, no_library, tmp_path, monkeypatch):
    path = _copy_model(exported("llama").dir, tmp_path / "m")
    captured = {}
    real = ort.InferenceSession

    def spy(model, so, providers=None):
        captured["so"] = so
        return real(model, so, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    make_session(path, threads=1)
    so = captured["so"]
    assert so.get_session_config_entry(runtime.DISABLE_OPTIMIZERS_KEY) == "ConstantFolding"
    assert so.intra_op_num_threads == 1


def test_the_config_entry_keeps_the_bitmap_decode_in_the_graph(exported, tmp_path):
    """The ORT fact behind make_session: without the entry the decode is folded into dense weights."""
    path = _copy_model(exported("llama").dir, tmp_path / "m")
    op_types = {}
    for disable in (False, True):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt_{disable}.onnx")
        if disable:
            so.add_session_config_entry(runtime.DISABLE_OPTIMIZERS_KEY, "ConstantFolding")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
        op_types[disable] = {n.op_type for n in optimized.graph.node}
    assert "BitShift" not in op_types[False] and "BitShift" in op_types[True]


def test_library_required_but_missing(exported, no_library, tmp_path):
    e = exported("llama")
    path = _copy_model(e.dir, tmp_path / "m")
    with pytest.raises(LibraryRequiredError, match="SALR_OPS_LIBRARY"):
        make_session(path, use_library=True)
    bare = _copy_model(e.dir, tmp_path / "bare", strip_functions=True)
    with pytest.raises(LibraryRequiredError, match="no function bodies"):
        make_session(bare)
    with pytest.raises(LibraryRequiredError, match="without function bodies"):
        make_session(bare, use_library=False)


def test_a_model_without_function_bodies_runs_on_the_library(exported, salr_lib, tmp_path):
    e = exported("llama")
    bare = _copy_model(e.dir, tmp_path / "bare", strip_functions=True)
    prompt = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(generate(make_session(bare), input_ids=prompt, max_new_tokens=5),
                                  generate(make_session(e.path, use_library=False), input_ids=prompt,
                                           max_new_tokens=5))


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_session(tmp_path / "nope.onnx")


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of prompt and input_ids"),
    (dict(prompt="w3 w4"), "needs a tokenizer"),
    (dict(input_ids=[[1, 2]], max_new_tokens=-1), "max_new_tokens"),
    (dict(input_ids=np.zeros((1, 0), dtype=np.int64)), "non-empty"),
])
def test_generate_argument_errors(exported, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(make_session(exported("llama").path), **kwargs)


def test_generation_stops_at_eos_and_pads_finished_rows(exported):
    session = make_session(exported("llama").path)
    prompt = np.array([[5, 17, 99], [7, 7, 1]])
    free = generate(session, input_ids=prompt, max_new_tokens=6)
    stop = int(free[0, 4])  # the second token row 0 generates
    out = generate(session, input_ids=prompt, max_new_tokens=6, eos_token_id=stop)
    assert (out[0, 4:] == stop).all()  # stopped, then padded with the stop token
    row1 = free[1, 3:]
    hits = np.nonzero(row1 == stop)[0]
    keep = 3 + (hits[0] + 1 if hits.size else row1.size)  # row 1 is unchanged up to its own stop
    np.testing.assert_array_equal(out[1, :min(keep, out.shape[1])], free[1, :min(keep, out.shape[1])])
    assert (out[1, keep:] == stop).all()


def test_generate_with_a_prompt_and_the_generate_command(exported, capsys):
    e = exported("llama")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(e.dir))
    out = generate(str(e.path), tokenizer, prompt="w5 w17 w99", max_new_tokens=4)
    assert out.shape == (1, 7) and list(out[0, :3]) == [5, 17, 99]

    parser = argparse.ArgumentParser()
    runtime.add_generate_arguments(parser)
    args = parser.parse_args([str(e.path), "--prompt", "w5 w17 w99", "--max-new-tokens", "4", "--no-library"])
    assert runtime.generate_main(args) == 0
    text = capsys.readouterr().out.strip()
    assert text == tokenizer.decode(out[0, 3:], skip_special_tokens=True)
