import json
import os

import pytest
import torch

from salr_edge.api import compress_
from salr_edge.checkpoint import CheckpointError, load_compressed, save_compressed
from salr_edge.config import SALRConfig
from tests.conftest import randomize_lora


@pytest.fixture
def compressed(tiny_llama):
    compress_(tiny_llama, SALRConfig(rank=4, lora_rank=2), show_progress=False)
    randomize_lora(tiny_llama)
    return tiny_llama


def _save_with_edited_tensors(model, directory, edit) -> None:
    """save_compressed, then rewrite its model.safetensors after `edit(tensors)` changed the dict in place."""
    from safetensors.torch import load_file, save_file

    save_compressed(model, directory)
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights))


def test_round_trip_gives_identical_logits(compressed, tmp_path):
    ids = torch.randint(0, 128, (2, 10))
    save_compressed(compressed, tmp_path / "ck")
    loaded = load_compressed(tmp_path / "ck")
    assert torch.equal(loaded(ids).logits, compressed(ids).logits)


def test_checkpoint_layout_and_metadata(compressed, tmp_path):
    save_compressed(compressed, tmp_path / "ck", values_dtype=torch.float16)
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors", "salr_config.json"]
    meta = json.loads((tmp_path / "ck" / "salr_config.json").read_text())
    assert meta["format"] == "salr-bitmap-v1" and meta["format_version"] == 1
    assert meta["values_dtype"] == "float16" and meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    layer = meta["layers"]["model.layers.0.mlp.down_proj"]
    assert [a["name"] for a in layer["adapters"]] == ["residual", "lora"]


def test_loaded_model_keeps_trainable_flags(compressed, tmp_path):
    save_compressed(compressed, tmp_path / "ck")
    loaded = load_compressed(tmp_path / "ck")
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
           {n for n, p in compressed.named_parameters() if p.requires_grad}


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_compressed(tmp_path / "nope")


def test_corrupt_weights_are_reported(compressed, tmp_path):
    save_compressed(compressed, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_compressed(tmp_path / "ck")


def test_newer_format_version_is_refused_naming_both(compressed, tmp_path):
    save_compressed(compressed, tmp_path / "ck")
    path = tmp_path / "ck" / "salr_config.json"
    meta = json.loads(path.read_text())
    meta["format_version"] = 9
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 9.*version 2"):
        load_compressed(tmp_path / "ck")


def test_checkpoint_missing_a_layer_tensor_is_reported(compressed, tmp_path):
    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.salr_A.lora"]

    _save_with_edited_tensors(compressed, tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_compressed(tmp_path / "ck")


def test_tampered_bitmap_is_reported(compressed, tmp_path):
    def edit(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight.bitmap"][0, 0] ^= 0xFF

    _save_with_edited_tensors(compressed, tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match="set bits"):
        load_compressed(tmp_path / "ck")


def test_failed_save_leaves_nothing_behind(compressed, tmp_path, monkeypatch):
    import salr_edge.checkpoint as ck

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError):
        ck.save_compressed(compressed, tmp_path / "ck")
    assert os.listdir(tmp_path) == []


def test_output_in_missing_directory_is_reported(compressed, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_compressed(compressed, tmp_path / "missing" / "ck")


def test_saving_an_uncompressed_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no SparseLowRankLinear"):
        save_compressed(tiny_llama, tmp_path / "ck")


@pytest.fixture
def quantized(tiny_llama):
    compress_(tiny_llama, SALRConfig(rank=4, lora_rank=2, values="int4", group_size=16), show_progress=False)
    randomize_lora(tiny_llama)
    return tiny_llama


def test_quantized_round_trip_gives_identical_logits_and_stored_integers(quantized, tmp_path):
    from salr_edge.modules.sparse_lowrank_linear import iter_sparse_lowrank

    ids = torch.randint(0, 128, (2, 10))
    save_compressed(quantized, tmp_path / "ck")
    loaded = load_compressed(tmp_path / "ck")
    assert torch.equal(loaded(ids).logits, quantized(ids).logits)
    saved = dict(iter_sparse_lowrank(quantized))
    for name, module in iter_sparse_lowrank(loaded):
        assert module.bits == 4 and module.group_size == 16
        assert torch.equal(module.salr_qvalues, saved[name].salr_qvalues)
        assert torch.equal(module.salr_qscales, saved[name].salr_qscales)


def test_quantized_checkpoint_is_format_v2_with_bits_and_scales(quantized, tmp_path):
    from safetensors.torch import load_file

    save_compressed(quantized, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "salr_config.json").read_text())
    assert meta["format"] == "salr-bitmap-v2" and meta["format_version"] == 2 and meta["values_dtype"] is None
    layer = meta["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["bits"] == 4 and layer["group_size"] == 16
    tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight.values"].dtype == torch.uint8
    assert tensors["model.layers.0.mlp.down_proj.weight.scales"].dtype == torch.float16


def test_float_checkpoint_stays_format_v1_without_scales(compressed, tmp_path):
    from safetensors.torch import load_file

    save_compressed(compressed, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "salr_config.json").read_text())
    assert meta["format"] == "salr-bitmap-v1" and meta["format_version"] == 1
    assert not any("bits" in layer for layer in meta["layers"].values())
    assert not any(k.endswith(".scales") for k in load_file(str(tmp_path / "ck" / "model.safetensors")))


def test_v1_checkpoint_from_before_quantized_values_loads(compressed, tmp_path):
    """A float checkpoint as the version-1 writer left it: its SALRConfig has no `values`/`group_size`."""
    ids = torch.randint(0, 128, (1, 6))
    save_compressed(compressed, tmp_path / "ck")
    path = tmp_path / "ck" / "salr_config.json"
    meta = json.loads(path.read_text())
    del meta["config"]["values"], meta["config"]["group_size"]
    path.write_text(json.dumps(meta, sort_keys=True, indent=2))
    loaded = load_compressed(tmp_path / "ck")
    assert torch.equal(loaded(ids).logits, compressed(ids).logits)
    assert SALRConfig.from_dict(loaded.salr_metadata["config"]).values == "float"


def test_quantized_checkpoint_missing_its_scales_is_reported(quantized, tmp_path):
    def edit(tensors):
        del tensors["model.layers.1.self_attn.o_proj.weight.scales"]

    _save_with_edited_tensors(quantized, tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.o_proj.weight.scales'"):
        load_compressed(tmp_path / "ck")


def test_quantized_checkpoint_with_wrong_scales_is_reported(quantized, tmp_path):
    def edit(tensors):
        key = "model.layers.0.mlp.up_proj.weight.scales"
        tensors[key] = tensors[key].float()

    _save_with_edited_tensors(quantized, tmp_path / "ck", edit)
    with pytest.raises(CheckpointError, match="up_proj.*scales must be float16, got torch.float32"):
        load_compressed(tmp_path / "ck")


def test_quantized_layer_in_a_v1_checkpoint_is_reported(quantized, tmp_path):
    save_compressed(quantized, tmp_path / "ck")
    path = tmp_path / "ck" / "salr_config.json"
    meta = json.loads(path.read_text())
    meta["format"], meta["format_version"] = "salr-bitmap-v1", 1
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bits=4.*format version 1"):
        load_compressed(tmp_path / "ck")
