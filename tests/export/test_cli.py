"""`salr-export`: tiny models end to end, and bad input as a one-line error with exit code 2 and no files."""

from __future__ import annotations

import json
import os

import onnx
import pytest
import torch

from salr_edge.export.cli import main
from salr_edge.runtime import make_session

from .conftest import REPO, make_tiny_model, make_tiny_tokenizer
from .helpers import assert_matches_pytorch


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny Llama as a transformers folder, its compressed checkpoint, a SALAAD checkpoint of it, and a
    tiny GPT-2 folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from salr_edge.checkpoint import save_compressed
    from salr_edge.config import SALAADConfig
    from salr_edge.salaad import save_salaad_checkpoint, train_salaad
    from salr_edge.training.finetune import FinetuneConfig

    from .conftest import VOCAB

    root = tmp_path_factory.mktemp("cli_models")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama", compress=False)
    model.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    save_compressed(make_tiny_model("llama"), root / "ckpt", tokenizer=tokenizer)
    save_compressed(make_tiny_model("llama", values="int8", group_size=16), root / "qckpt", tokenizer=tokenizer)
    model = make_tiny_model("llama", compress=False)
    tokens = torch.randint(0, VOCAB, (2048,), generator=torch.Generator().manual_seed(1))
    _, trainer = train_salaad(model, tokens, SALAADConfig(target_rank_ratio=0.3, target_density=0.3, admm_every=2),
                              FinetuneConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1), show_progress=False)
    save_salaad_checkpoint(model, trainer, root / "salaad", tokenizer=tokenizer)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(root / "gpt2")
    return root


def _run_ok(args, capsys):
    code = main([*args, "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def test_fresh_salr_export_from_a_model_folder(tiny_dirs, tmp_path, capsys):
    from salr_edge.api import compress_
    from salr_edge.config import SALRConfig
    from salr_edge.models import load_model

    out = tmp_path / "model.onnx"
    captured = _run_ok([str(out), "--model", str(tiny_dirs / "llama"), "--rank", "4", "--values-dtype", "fp32"],
                       capsys)
    assert "14 compressed layers in 8 SALRLinear nodes" in captured.out
    assert {p.name for p in tmp_path.iterdir()} >= {"model.onnx", "model.onnx.data", "genai_config.json",
                                                    "tokenizer.json"}
    # The same compression in PyTorch computes what the export computes (fp32 values: exact weights).
    model, _ = load_model(tiny_dirs / "llama")
    compress_(model, SALRConfig(sparsity=0.5, rank=4, lora_rank=0), show_progress=False)
    assert_matches_pytorch(make_session(out), model)


def test_fresh_int4_export_compresses_error_aware_into_salr_linear_q(tiny_dirs, tmp_path, capsys, no_library):
    from salr_edge.api import compress_
    from salr_edge.config import SALRConfig
    from salr_edge.models import load_model

    out = tmp_path / "model.onnx"
    captured = _run_ok([str(out), "--model", str(tiny_dirs / "llama"), "--rank", "4", "--granularity", "2:4",
                        "--values", "int4", "--group-size", "16", "--no-genai-config"], capsys)
    assert "14 compressed layers in 8 SALRLinearQ nodes" in captured.out
    # The same compression in PyTorch computes what the function bodies compute.
    model, _ = load_model(tiny_dirs / "llama")
    compress_(model, SALRConfig(sparsity=0.5, rank=4, lora_rank=0, granularity="2:4", values="int4", group_size=16),
              show_progress=False)
    assert_matches_pytorch(make_session(out, use_library=False), model)


def test_quantized_checkpoint_exports_as_stored(tiny_dirs, tmp_path, capsys, no_library):
    from salr_edge.checkpoint import load_compressed

    out = tmp_path / "q.onnx"
    captured = _run_ok([str(out), "--checkpoint", str(tiny_dirs / "qckpt"), "--no-genai-config"], capsys)
    assert "14 compressed layers in 8 SALRLinearQ nodes" in captured.out
    graph = onnx.load(str(out), load_external_data=False).graph
    attrs = {a.name: a.i for a in next(n for n in graph.node if n.op_type == "SALRLinearQ").attribute}
    assert attrs["bits"] == 8 and attrs["group_size"] == 16
    assert_matches_pytorch(make_session(out, use_library=False), load_compressed(tiny_dirs / "qckpt"))


def test_dense_export_is_the_uncompressed_model(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "dense.onnx"
    captured = _run_ok([str(out), "--model", str(tiny_dirs / "llama"), "--method", "dense", "--no-genai-config"],
                       capsys)
    assert "0 compressed layers in 0 SALRLinear nodes" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx", "dense.onnx.data"]
    from salr_edge.models import load_model

    model, _ = load_model(tiny_dirs / "llama")
    assert_matches_pytorch(make_session(out), model)


def test_checkpoint_export_without_function_fallback_or_fusion(tiny_dirs, tmp_path, capsys):
    from salr_edge.checkpoint import load_compressed

    out = tmp_path / "ckpt.onnx"
    _run_ok([str(out), "--checkpoint", str(tiny_dirs / "ckpt"), "--no-function-fallback", "--no-genai-config",
             "--no-fuse-linears"], capsys)
    model = onnx.load(str(out), load_external_data=False)
    assert not model.functions
    assert sum(n.op_type == "SALRLinear" for n in model.graph.node) == 14
    from .conftest import find_library

    if find_library() is not None:
        assert_matches_pytorch(make_session(out, use_library=True), load_compressed(tiny_dirs / "ckpt"))


def test_salaad_checkpoint_export_is_cut_to_the_budget(tiny_dirs, tmp_path, capsys):
    from salr_edge.salaad import extract

    out = tmp_path / "salaad.onnx"
    captured = _run_ok([str(out), "--checkpoint", str(tiny_dirs / "salaad"), "--budget", "0.5", "--no-genai-config"],
                       capsys)
    assert "14 compressed layers in 8 SALRLinear nodes" in captured.out
    model = extract(tiny_dirs / "salaad", "0.5")
    assert model.salr_metadata["config"]["extraction"]["budget"]["value"] == 0.5
    assert_matches_pytorch(make_session(out), model)


def _expect_error(args, capsys, tmp_path, *fragments):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("salr-export: error: ")
    for fragment in fragments:
        assert fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "partial files left behind"


def test_unsupported_architecture(tiny_dirs, tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--model", str(tiny_dirs / "gpt2")], capsys, tmp_path,
                  "'gpt2'", "supported: llama, mistral, qwen2, qwen3")


def test_missing_checkpoint(tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--checkpoint", str(tmp_path / "nope")], capsys, tmp_path,
                  "does not exist")


def test_folder_that_is_not_a_checkpoint(tiny_dirs, tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--checkpoint", str(tiny_dirs / "llama")], capsys, tmp_path,
                  "not a salr-edge checkpoint")


def test_corrupt_checkpoint(tiny_dirs, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "corrupt"
    shutil.copytree(tiny_dirs / "ckpt", ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _expect_error([str(out_dir / "m.onnx"), "--checkpoint", str(ckpt)], capsys, out_dir, "corrupt")
    (ckpt / "salr_config.json").write_text("{not json")
    _expect_error([str(out_dir / "m.onnx"), "--checkpoint", str(ckpt)], capsys, out_dir, "corrupt")


def test_newer_format_version(tiny_dirs, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "future"
    shutil.copytree(tiny_dirs / "ckpt", ckpt)
    meta = json.loads((ckpt / "salr_config.json").read_text())
    meta["format_version"] = 99
    (ckpt / "salr_config.json").write_text(json.dumps(meta))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _expect_error([str(out_dir / "m.onnx"), "--checkpoint", str(ckpt)], capsys, out_dir, "version 99", "version 2")


def test_output_in_a_missing_folder(tiny_dirs, tmp_path, capsys):
    _expect_error([str(tmp_path / "a" / "b" / "m.onnx"), "--model", str(tiny_dirs / "llama")], capsys, tmp_path,
                  "does not exist")


def test_output_is_a_directory(tiny_dirs, tmp_path, capsys):
    (tmp_path / "d.onnx").mkdir()
    _expect_error([str(tmp_path / "d.onnx"), "--model", str(tiny_dirs / "llama")], capsys, tmp_path,
                  "is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder(tiny_dirs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _expect_error([str(locked / "m.onnx"), "--model", str(tiny_dirs / "llama")], capsys, locked, "not writable")
    finally:
        locked.chmod(0o700)


def test_unwritable_output_folder_as_any_user(tiny_dirs, tmp_path, capsys, monkeypatch):
    """The same path for root: the write check reports an unwritable folder before any work."""
    import salr_edge.io_utils as io_utils

    real_access = os.access
    monkeypatch.setattr(io_utils.os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    _expect_error([str(tmp_path / "m.onnx"), "--model", str(tiny_dirs / "llama")], capsys, tmp_path, "not writable")


def test_compression_options_conflict_with_a_checkpoint(tiny_dirs, tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--checkpoint", str(tiny_dirs / "ckpt"), "--sparsity", "0.7"],
                  capsys, tmp_path, "--sparsity only apply")


def test_budget_needs_a_salaad_checkpoint(tiny_dirs, tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--checkpoint", str(tiny_dirs / "ckpt"), "--budget", "0.4"],
                  capsys, tmp_path, "--budget applies only to a SALAAD checkpoint")


def test_fit_needs_a_salaad_checkpoint(tiny_dirs, tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--checkpoint", str(tiny_dirs / "ckpt"), "--fit", "project"],
                  capsys, tmp_path, "--fit applies only to a SALAAD checkpoint")


def test_malformed_budget_is_refused(tiny_dirs, tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--checkpoint", str(tiny_dirs / "salaad"), "--budget", "1.5x"],
                  capsys, tmp_path, "cannot read budget '1.5x'")


def test_fp16_with_fp32_values_is_refused(tiny_dirs, tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--dtype", "fp16", "--values-dtype", "fp32"], capsys, tmp_path,
                  "needs dtype='fp32'")


def test_unknown_values_kind_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "m.onnx"), "--values", "int5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "invalid choice: 'int5'" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_group_size_zero_is_refused(tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--values", "int4", "--group-size", "0"], capsys, tmp_path,
                  "group_size must be None or an integer >= 1, got 0")


def test_group_size_without_integer_values_is_refused(tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--group-size", "16"], capsys, tmp_path,
                  "group_size applies only with values 'int8' or 'int4'")


def test_quantized_values_with_the_dense_method_are_refused(tmp_path, capsys):
    _expect_error([str(tmp_path / "m.onnx"), "--method", "dense", "--values", "int4"], capsys, tmp_path,
                  "needs method 'salr'", "no quantized path")


def test_entry_point_is_declared():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["salr-export"] == "salr_edge.export.cli:main"
