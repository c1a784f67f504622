"""salr-bench on tiny exported models: schema, outputs, correctness gate, bad input."""

from __future__ import annotations

import json

import onnx
import pytest

from salr_edge.device_bench.cli import main
from tests.export.conftest import make_tiny_model

FAST = ["--threads", "1", "--prompt-len", "8", "--gen-len", "4", "--reps", "2", "--ppl-windows", "0"]


def _export(tmp_path, name: str, method: str):
    from salr_edge.export.exporter import ExportConfig, export_onnx

    model = make_tiny_model("llama", compress=method == "salr")
    path = tmp_path / name / "model.onnx"
    path.parent.mkdir()
    export_onnx(model, path, ExportConfig(method=method, genai_config=False, copy_library=False))
    return path


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("bench"), "dense", "dense")


def _library_built() -> bool:
    from salr_edge.runtime import library_path

    try:
        library_path()
        return True
    except FileNotFoundError:
        return False


def test_json_markdown_and_plots_are_written(dense_model, tmp_path):
    out = tmp_path / "out"
    assert main([str(dense_model), *FAST, "--prefill-sweep", "4,8", "--output", str(out)]) == 0
    run = json.loads((out / "bench.json").read_text())
    assert run["schema_version"] == 1 and run["ort_version"] and run["device"]["cores"] >= 1
    model = run["models"][0]
    for key in ("file_bytes", "load_seconds", "peak_rss_mb", "prefill_seconds", "ttft_seconds",
                "decode_token_seconds", "decode_tokens_per_second"):
        assert model[key] > 0, key
    assert len(model["greedy_tokens"]) == 4 and model["gate"]["passed"]
    metrics = {r["metric"] for r in run["records"]}
    assert metrics == {"prefill", "decode_step", "decode_tokens_per_second"}
    assert all(r["p20"] <= r["p50"] <= r["p80"] for r in run["records"])
    assert "| dense |" in (out / "bench.md").read_text()
    for png in ("tokens_and_bytes.png", "prefill_latency.png"):
        assert (out / png).stat().st_size > 1000


def test_profile_summarizes_time_per_op_type(dense_model, tmp_path):
    assert main([str(dense_model), *FAST, "--no-memory-probe", "--profile", "--output", str(tmp_path)]) == 0
    profile = json.loads((tmp_path / "bench.json").read_text())["models"][0]["op_profile"]
    assert "MatMul" in profile and all(v >= 0 for v in profile.values())


@pytest.mark.skipif(not _library_built(), reason="custom-op library not built")
def test_gate_passes_for_a_correct_salr_model(tmp_path):
    path = _export(tmp_path, "salr", "salr")
    assert main([str(path), *FAST, "--no-memory-probe", "--output", str(tmp_path / "o")]) == 0
    gate = json.loads((tmp_path / "o" / "bench.json").read_text())["models"][0]["gate"]
    assert gate["passed"] and gate["max_abs_diff"] < gate["tolerance"]


@pytest.mark.skipif(not _library_built(), reason="custom-op library not built")
def test_gate_catches_a_deliberately_wrong_model(tmp_path, capsys):
    path = _export(tmp_path, "wrong", "salr")
    proto = onnx.load(str(path), load_external_data=False)
    fn = next(f for f in proto.functions if f.name == "SALRLinear")
    # Make the reference body compute 2·Y: the library kernel and the body now disagree.
    final = fn.output[0]
    for node in fn.node:
        node.output[:] = [o + "_pre" if o == final else o for o in node.output]
    fn.node.extend([onnx.helper.make_node("Add", [final + "_pre", final + "_pre"], [final])])
    onnx.save(proto, str(path))
    assert main([str(path), *FAST, "--no-memory-probe", "--output", str(tmp_path / "o")]) == 3
    assert "correctness gate FAILED" in capsys.readouterr().err
    run = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert not run["models"][0]["gate"]["passed"] and run["records"] == []


@pytest.mark.parametrize("argv, message", [
    (["missing.onnx"], "does not exist"),
    (["--provider", "cuda", "MODEL"], "provider cuda"),
    (["NOT_ONNX"], "is not an ONNX model"),
    ([], "at least one model"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, tmp_path, dense_model, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf at all \xff\xfe")
    argv = [str(dense_model) if a == "MODEL" else str(junk) if a == "NOT_ONNX" else a for a in argv]
    assert main(argv + ["--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
