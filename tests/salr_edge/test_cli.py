import json
import subprocess
import sys

import pytest

from salr_edge.cli import main


def test_missing_model_path_is_a_one_line_error(tmp_path, capsys):
    assert main(["compress", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_sparsity_out_of_range_is_a_one_line_error(tmp_path, capsys):
    assert main(["compress", "--sparsity", "1.5", "--output", str(tmp_path / "out")]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


def test_output_in_missing_directory_is_reported(tmp_path, capsys):
    assert main(["compress", "--output", str(tmp_path / "a" / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_finetune_of_a_non_checkpoint_is_reported(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("hello world " * 100)
    assert main(["finetune", "--checkpoint", str(tmp_path), "--data", str(tmp_path / "data.txt"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "not a salr-edge checkpoint" in capsys.readouterr().err


def test_unsupported_architecture_is_named(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    assert main(["compress", "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out")]) == 2
    assert "unsupported architecture 'gpt2'; supported: llama" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["compress", "finetune", "eval"])
def test_every_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "salr_edge.cli", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: salr " + command in out.stdout


def _tiny_model_dir(tmp_path, tiny_llama):
    """A tiny Llama with a word-level tokenizer in tmp_path/m, and a text file of its words."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"<unk>": 127}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w0")
    tiny_llama.save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(3000)))
    return tmp_path / "m", text


def test_compress_with_int4_values_writes_a_v2_checkpoint_that_finetunes(tmp_path, tiny_llama):
    model_dir, text = _tiny_model_dir(tmp_path, tiny_llama)
    assert main(["compress", "--model", str(model_dir), "--output", str(tmp_path / "c"), "--rank", "4",
                 "--lora-rank", "2", "--granularity", "2:4", "--values", "int4", "--group-size", "16"]) == 0
    saved = json.loads((tmp_path / "c" / "salr_config.json").read_text())
    assert saved["format"] == "salr-bitmap-v2"
    assert saved["config"]["values"] == "int4" and saved["config"]["group_size"] == 16
    assert main(["finetune", "--checkpoint", str(tmp_path / "c"), "--data", str(text), "--output", str(tmp_path / "f"),
                 "--steps", "2", "--seq-len", "32", "--batch-size", "2"]) == 0
    assert json.loads((tmp_path / "f" / "salr_config.json").read_text())["format"] == "salr-bitmap-v2"


def test_compress_rejects_an_unknown_value_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--values", "int5", "--output", str(tmp_path / "out")])
    assert exc.value.code == 2 and "int5" in capsys.readouterr().err


def test_end_to_end_compress_finetune_eval_on_a_tiny_model(tmp_path, tiny_llama):
    model_dir, text = _tiny_model_dir(tmp_path, tiny_llama)
    assert main(["compress", "--model", str(model_dir), "--output", str(tmp_path / "c"), "--rank", "4",
                 "--lora-rank", "2", "--pruning", "wanda", "--calib-data", str(text), "--calib-seq-len", "32",
                 "--calib-samples", "2"]) == 0
    assert main(["finetune", "--checkpoint", str(tmp_path / "c"), "--data", str(text), "--output", str(tmp_path / "f"),
                 "--steps", "3", "--seq-len", "32", "--batch-size", "2"]) == 0
    assert main(["eval", "--model-or-checkpoint", str(tmp_path / "f"), "--data", str(text), "--context", "64",
                 "--max-windows", "2"]) == 0
