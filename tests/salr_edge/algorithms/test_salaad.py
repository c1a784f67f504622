import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from salr_edge.algorithms.salaad import (LayerSupply, MatrixState, SALAADTrainer, initialize_state, layer_bytes,
                                         parse_budget, plan_extraction, prepare_model, project_best, project_to,
                                         projection_error, run_round,
                                         scheduled_rho)
from salr_edge.checkpoint import CheckpointError, load_compressed, save_compressed
from salr_edge.config import SALAADConfig, SALRConfig
from salr_edge.modules.sparse_lowrank_linear import iter_sparse_lowrank
from salr_edge.salaad import extract, load_salaad_checkpoint, save_salaad_checkpoint, train_salaad
from salr_edge.training.finetune import FinetuneConfig
from tests.conftest import make_tiny_llama

TOKENS = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(1))
SALAAD = dict(target_rank_ratio=0.3, target_density=0.2, admm_every=2, rho=0.1)


def _model():
    torch.manual_seed(0)
    return make_tiny_llama()


def _train_cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=32, lr=1e-3, warmup_steps=1, log_every=1)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, trainer, checkpoint dir) of one short SALAAD run, shared by the extraction tests."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    _, trainer = train_salaad(model, TOKENS, SALAADConfig(**SALAAD), _train_cfg(), show_progress=False)
    ckpt = tmp_path_factory.mktemp("salaad") / "ckpt"
    save_salaad_checkpoint(model, trainer, ckpt)
    return model, trainer, ckpt


# ---- config ---------------------------------------------------------------------------------------

def test_config_json_round_trip_and_per_kind_targets():
    cfg = SALAADConfig(target_rank_ratio=0.2, target_density_mlp=0.4, target_rank_ratio_attn=0.1,
                       rho_schedule="shape", svd_method="randomized", target_modules=["q_proj", "up_proj"])
    assert SALAADConfig.from_json(cfg.to_json()) == cfg
    assert cfg.targets_for("model.layers.0.self_attn.q_proj") == ("attn", 0.1, 0.3)
    assert cfg.targets_for("model.layers.0.mlp.up_proj") == ("mlp", 0.2, 0.4)
    assert cfg.targets_for("lm_head") == ("other", 0.2, 0.3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_rank_ratio=0.0), "target_rank_ratio must be in"),
    (dict(target_rank_ratio=1.5), "target_rank_ratio must be in"),
    (dict(target_density=-0.1), "target_density must be in"),
    (dict(target_density_attn=2.0), "target_density_attn must be in"),
    (dict(rho=0.0), "rho must be positive"),
    (dict(rho_schedule="cosine"), "rho_schedule must be one of"),
    (dict(sparse_step="l0"), "sparse_step must be one of"),
    (dict(rho=0.1, rho_max=0.01), "rho_max must be >= rho"),
    (dict(rho_growth=0.9), "rho_growth must be >= 1"),
    (dict(admm_every=0), "admm_every must be a positive integer"),
    (dict(svd_method="randomized", svd_rank_cap=0.1), "svd_rank_cap=0.1 is below"),
    (dict(alpha0=0.0), "alpha0 must be None"),
    (dict(energy=1.5), "energy must be in"),
    (dict(target_modules=None), "target_modules"),
    (dict(version=2), "version 2"),
])
def test_invalid_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SALAADConfig(**kwargs)


def test_unknown_field_in_dict_is_rejected():
    with pytest.raises(ValueError, match="unknown SALAADConfig fields"):
        SALAADConfig.from_dict({"target_density": 0.5, "bogus": 1})


# ---- controller and schedules ---------------------------------------------------------------------

@pytest.mark.parametrize("mu", [1.0, 0.1, 0.01])
def test_controller_drives_a_toy_matrix_to_its_rank_and_density_targets(mu):
    """X trades a quadratic loss (μ/2)‖X − W‖² against the penalty, as training does between rounds."""
    w = torch.randn(60, 45, generator=torch.Generator().manual_seed(0)) / math.sqrt(45)
    cfg = SALAADConfig(target_rank_ratio=0.2, target_density=0.1, rho=1.0, rho_schedule="fixed")
    state = MatrixState("toy", 0, (60, 45), "other", 0.2, 0.1)
    initialize_state(cfg, state, w)
    for _ in range(60):
        x = (mu * w + state.rho * state.target) / (mu + state.rho)  # argmin over X of loss + penalty
        run_round(cfg, state, x)
    assert state.rank_ratio == pytest.approx(0.2, abs=0.03)
    assert state.density == pytest.approx(0.1, abs=0.02)
    assert state.residual < 1e-2 * float(w.norm())  # X = L + S reached


def test_the_hard_sparse_step_holds_the_density_and_closes_the_gap():
    w = torch.randn(60, 45, generator=torch.Generator().manual_seed(0)) / math.sqrt(45)
    cfg = SALAADConfig(target_rank_ratio=0.2, target_density=0.1, rho=1.0, rho_schedule="fixed", sparse_step="hard")
    state = MatrixState("toy", 0, (60, 45), "other", 0.2, 0.1)
    initialize_state(cfg, state, w)
    assert state.density == pytest.approx(0.1, abs=1 / w.numel())
    for _ in range(60):
        x = (0.1 * w + state.rho * state.target) / (0.1 + state.rho)
        run_round(cfg, state, x)
        assert state.density == pytest.approx(0.1, abs=1 / w.numel())
    assert state.rank_ratio == pytest.approx(0.2, abs=0.03)
    assert state.residual < 1e-2 * float(w.norm())


def test_rho_schedules():
    shape_cfg = SALAADConfig(rho=2.0, rho_schedule="shape")
    state = MatrixState("m", 0, (16, 9), "other", 0.3, 0.3)
    initialize_state(shape_cfg, state, torch.randn(16, 9))
    assert state.rho == pytest.approx(2.0 / 12.0)
    ramp = SALAADConfig(rho=0.1, rho_schedule="ramp", rho_growth=2.0, rho_max=0.4, alpha_gain=0.0, beta_gain=0.0)
    state = MatrixState("m", 0, (16, 9), "other", 0.3, 0.3)
    x = torch.randn(16, 9)
    initialize_state(ramp, state, x)
    tau_l, tau_s = state.alpha / state.rho, state.beta / state.rho
    rhos = []
    for _ in range(3):
        run_round(ramp, state, x)
        rhos.append(state.rho)
    assert rhos == pytest.approx([0.2, 0.4, 0.4])
    assert scheduled_rho(ramp, state) == 0.4
    # with zero gains, the thresholds α/ρ and β/ρ survive every change of ρ
    assert state.alpha / state.rho == pytest.approx(tau_l) and state.beta / state.rho == pytest.approx(tau_s)


def test_initialization_hits_the_targets_on_the_initial_weights():
    x = torch.randn(48, 40, generator=torch.Generator().manual_seed(3))
    cfg = SALAADConfig(target_rank_ratio=0.25, target_density=0.15)
    state = MatrixState("m", 0, (48, 40), "other", 0.25, 0.15)
    initialize_state(cfg, state, x)
    assert state.effective_rank == math.ceil(0.25 * 40)
    assert state.density == pytest.approx(0.15, abs=2 / x.numel())
    assert torch.equal(state.Y, torch.zeros_like(x))


# ---- training -------------------------------------------------------------------------------------

def test_penalty_gradient_reaches_the_dense_weights():
    model = _model()
    names = prepare_model(model, SALAADConfig(**SALAAD))
    trainer = SALAADTrainer(model, SALAADConfig(**SALAAD))
    trainer.on_train_start(0)
    trainer.extra_loss(0).backward()
    for name in names:
        state, weight = trainer.states[name], model.get_submodule(name).weight
        expected = state.rho * (weight.detach() - state.L.dense() - state.S) + state.Y  # ∇(ρ/2)‖X−L−S+Y/ρ‖²
        torch.testing.assert_close(weight.grad, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith("proj.weight"))


def test_training_logs_every_matrix_and_round(tmp_path):
    model = _model()
    log = tmp_path / "log.jsonl"
    history, trainer = train_salaad(model, TOKENS, SALAADConfig(**SALAAD), _train_cfg(), log_path=log,
                                    show_progress=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 14 * 4  # 14 matrices × (round 0 + 3 rounds at steps 2, 4, 6)
    assert {"alpha", "beta", "rho", "rank_ratio", "density", "residual"} <= set(rows[0])
    assert {r["step"] for r in rows} == {0, 2, 4, 6} and len(history) == 6
    assert set(trainer.summary) == {"rank", "dens", "gap", "rho"}


def test_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = SALAADConfig(**{**SALAAD, "admm_every": 1})
    straight = _model()
    _, t_straight = train_salaad(straight, TOKENS, cfg, _train_cfg(), show_progress=False)
    first = _model()
    train_salaad(first, TOKENS, cfg, _train_cfg(output_dir=str(tmp_path), max_minutes=0.0), show_progress=False)
    resumed = _model()  # a fresh process: weights and ADMM state come from trainer_state
    _, t_resumed = train_salaad(resumed, TOKENS, cfg, _train_cfg(output_dir=str(tmp_path), resume=True),
                                show_progress=False)
    for name, state in t_straight.states.items():
        other = t_resumed.states[name]
        torch.testing.assert_close(straight.get_submodule(name).weight, resumed.get_submodule(name).weight,
                                   atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(state.L.dense(), other.L.dense(), atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(state.Y, other.Y, atol=1e-6, rtol=1e-5, msg=name)
        assert state.rounds == other.rounds == 6
        assert state.alpha == pytest.approx(other.alpha, rel=1e-5)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    cfg = SALAADConfig(**SALAAD, svd_method="randomized", svd_rank_cap=0.5)
    _, trainer = train_salaad(model, TOKENS, cfg, _train_cfg(batch_size=2), show_progress=False)
    assert {s.owner for s in trainer.owned()} == {rank}
    save_salaad_checkpoint(model, trainer, out)  # gathers the odd matrices from rank 1
    dist.destroy_process_group()


def test_ddp_on_two_gloo_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    out = str(tmp_path / "ddp")
    port = 29500 + (os.getpid() + 357) % 1000
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    single = _model()
    cfg = SALAADConfig(**SALAAD, svd_method="randomized", svd_rank_cap=0.5)
    _, trainer = train_salaad(single, TOKENS, cfg, _train_cfg(batch_size=4), show_progress=False)
    ddp_model, ddp_states, _ = load_salaad_checkpoint(out)
    for name, state in trainer.states.items():
        torch.testing.assert_close(ddp_model.get_submodule(name).weight, single.get_submodule(name).weight,
                                   atol=1e-5, rtol=1e-4, msg=name)
        other = ddp_states[name]
        torch.testing.assert_close(other.L.dense(), state.L.dense(), atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(other.S, state.S, atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(other.Y, state.Y, atol=1e-5, rtol=1e-4, msg=name)
        assert other.alpha == pytest.approx(state.alpha, rel=1e-3) and other.rounds == state.rounds


# ---- budgets and extraction -----------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, value", [
    (0.4, "fraction", 0.4), ("0.4", "fraction", 0.4), ("40%", "fraction", 0.4), (40_000_000, "bytes", 4e7),
    ("40MB", "bytes", 4e7), ("2MiB", "bytes", 2 * 2**20), ("40000000", "bytes", 4e7),
    ("20M params", "params", 2e7), ("1.5e4params", "params", 1.5e4), ("300k parameters", "params", 3e5),
])
def test_parse_budget(text, kind, value):
    spec = parse_budget(text)
    assert spec.kind == kind and spec.value == pytest.approx(value)


@pytest.mark.parametrize("budget, error", [(1.5, ValueError), (0.0, ValueError), (-3, ValueError), ("lots", ValueError),
                                           (True, TypeError), ("40 parsecs", ValueError)])
def test_parse_budget_rejects_nonsense(budget, error):
    with pytest.raises(error):
        parse_budget(budget)


def _supply():
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 2
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, (d, k) in enumerate(shapes):
        rank = int(torch.randint(40, 150, (1,), generator=g)) * min(d, k) // 576
        out[f"m{i}"] = LayerSupply((d, k), rank, min(d, k) // 2, int(0.5 * d * k))
    return out


@pytest.mark.parametrize("fraction", [0.9, 0.75, 0.6, 0.5, 0.4, 0.35, 0.1])
def test_plan_lands_within_two_percent_of_a_fractional_budget(fraction):
    supply = _supply()
    plan = plan_extraction(supply, fraction)
    target = fraction * plan.dense_bytes
    assert abs(plan.bytes - target) <= 0.02 * target and plan.bytes <= target
    assert plan.bytes == sum(layer_bytes(*supply[n].shape, z, r) for n, (r, z) in plan.counts.items())


def test_plan_scales_every_layer_by_one_factor():
    supply = _supply()
    small, large = plan_extraction(supply, 0.4), plan_extraction(supply, 0.8)
    assert small.factor < large.factor
    for name, layer in supply.items():
        assert small.counts[name][0] == min(layer.max_rank, round(small.factor * layer.rank))
        assert small.counts[name][0] <= large.counts[name][0] and small.counts[name][1] <= large.counts[name][1]
    params = plan_extraction(supply, "3M params")
    assert abs(params.params - 3e6) <= 0.02 * 3e6


@pytest.mark.parametrize("budget, message", [
    (0.05, "below what the structure can express"),
    ("1GB", "not below the dense fp16 size"),
    ("1000M params", "not below the dense count"),
])
def test_plan_rejects_budgets_outside_the_structure(budget, message):
    with pytest.raises(ValueError, match=message):
        plan_extraction(_supply(), budget)


def test_plan_rejects_a_budget_above_what_l_and_s_hold():
    thin = {n: LayerSupply(s.shape, 2, 2, 100) for n, s in _supply().items()}
    with pytest.raises(ValueError, match="above what this checkpoint's L and S hold"):
        plan_extraction(thin, 0.9)


def test_extraction_hits_the_budget_and_keeps_the_largest_parts(tmp_path, trained):
    from salr_edge.device_bench.quality_table import layer_bytes as table_bytes

    _, trainer, ckpt = trained
    model = extract(ckpt, 0.3)
    comp, dense = table_bytes(model)  # the quality table's count: bitmap + fp16 values + offsets + adapters
    assert abs(comp - 0.3 * dense) <= 0.02 * 0.3 * dense
    plan = model.salr_metadata["config"]["extraction"]
    assert plan["bytes"] == comp and plan["dense_fp16_bytes"] == dense
    layers = dict(iter_sparse_lowrank(model))
    assert len(layers) == 14
    for name, module in layers.items():
        state = trainer.states[name]
        kept = module.salr_mask
        if kept.any() and (~kept).any():  # the largest-magnitude entries of S are the ones kept
            assert float(state.S.abs()[kept].min()) >= float(state.S.abs()[~kept].max())
        rank = plan["layers"][name]["rank"]
        if rank:  # the adapter is L's top-`rank` truncation (fp16-rounded factors)
            top = (state.L.U[:, :rank] * state.L.s[:rank]) @ state.L.Vh[:rank]
            torch.testing.assert_close(module.get_delta_weight(), top, atol=2e-3, rtol=2e-3, msg=name)
        values = module.weight[kept]
        assert torch.equal(values, values.half().float())  # what an fp16 checkpoint holds
    save_compressed(model, tmp_path / "cut", values_dtype=torch.float16, adapter_dtype=torch.float16)
    loaded = load_compressed(tmp_path / "cut")
    ids = TOKENS[:40][None]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "cut" / "salr_config.json").read_text())["method"] == "salaad"


def test_a_model_converted_from_gguf_saves_and_loads(trained, tmp_path):
    """The built-in model's config still names its GGUF source, which makes `save_pretrained` refuse it."""
    from transformers import AutoModelForCausalLM

    model, trainer, _ = trained
    model.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "dequantize": False}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="gguf"):
        converted.save_pretrained(tmp_path / "refused")
    save_salaad_checkpoint(converted, trainer, tmp_path / "ckpt")
    loaded, states, _ = load_salaad_checkpoint(tmp_path / "ckpt")
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(want, got), name
    assert states.keys() == trainer.states.keys()


def test_extract_rejects_checkpoints_without_salaad_state(tmp_path):
    with pytest.raises(FileNotFoundError):
        extract(tmp_path / "missing", 0.5)
    with pytest.raises(CheckpointError, match="holds no SALAAD state"):
        extract(tmp_path, 0.5)
    from salr_edge.api import compress_

    model = _model()
    compress_(model, SALRConfig(rank=2, lora_rank=0), show_progress=False)
    save_compressed(model, tmp_path / "salr")
    with pytest.raises(CheckpointError, match="already cut"):
        extract(tmp_path / "salr", 0.5)


def test_compress_with_a_salaad_config_trains_and_cuts_in_place():
    from salr_edge.api import compress_

    model = _model()
    out = compress_(model, SALAADConfig(**SALAAD), train_data=TOKENS, train_config=_train_cfg(steps=2), budget=0.5,
                    show_progress=False)
    assert out is model and sum(1 for _ in iter_sparse_lowrank(model)) == 14
    assert model.salr_metadata["config"]["extraction"]["fraction_of_dense"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="dense model"):
        SALAADTrainer(model, SALAADConfig(**SALAAD))


def test_cli_salaad_train_then_extract_then_eval(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from salr_edge.cli import main

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"<unk>": 127}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    _model().save_pretrained(tmp_path / "m")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w0").save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(3000)))
    assert main(["salaad", "train", "--model", str(tmp_path / "m"), "--data", str(text), "--output",
                 str(tmp_path / "s"), "--steps", "4", "--seq-len", "32", "--batch-size", "2", "--admm-every", "2",
                 "--target-density-mlp", "0.4"]) == 0
    assert (tmp_path / "s" / "salaad_log.jsonl").is_file()
    assert json.loads((tmp_path / "s" / "salaad_config.json").read_text())["config"]["target_density_mlp"] == 0.4
    assert main(["salaad", "extract", "--checkpoint", str(tmp_path / "s"), "--budget", "40%", "--output",
                 str(tmp_path / "c"), "--fit", "project"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["fraction_of_dense"] == pytest.approx(0.4, abs=0.008) and report["fit"] == "project"
    assert main(["eval", "--model-or-checkpoint", str(tmp_path / "c"), "--data", str(text), "--context", "64",
                 "--max-windows", "2"]) == 0
    assert main(["salaad", "extract", "--checkpoint", str(tmp_path / "c"), "--budget", "0.4", "--output",
                 str(tmp_path / "d")]) == 2
    assert "holds no SALAAD state" in capsys.readouterr().err
    assert main(["salaad", "extract", "--checkpoint", str(tmp_path / "s"), "--budget", "0.01", "--output",
                 str(tmp_path / "d")]) == 2
    assert "1/16" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_a_budget_above_the_trained_structure_keeps_all_of_s_and_the_largest_residual_entries(trained):
    model, trainer, ckpt = trained
    structure = extract(ckpt).salr_metadata["config"]["extraction"]["fraction_of_dense"]
    budget = 0.5 * (structure + 1.0)
    cut = extract(ckpt, budget)
    plan = cut.salr_metadata["config"]["extraction"]
    assert abs(plan["fraction_of_dense"] - budget) <= 0.02 * budget
    for name, module in iter_sparse_lowrank(cut):
        state = trainer.states[name]
        kept, support = module.salr_mask, state.S != 0
        assert bool(kept[support].all()), name  # every entry of S stays
        x = model.get_submodule(name).weight.detach()
        rank = module.total_rank
        residual = (x - (state.L.U[:, :rank] * state.L.s[:rank]) @ state.L.Vh[:rank]).abs()
        extra, left = kept & ~support, ~kept
        if extra.any() and left.any():  # the entries added beside S are the residual's largest
            assert float(residual[extra].min()) >= float(residual[left].max()) - 1e-6, name
        assert torch.allclose(module.weight[extra], (x - (state.L.U[:, :rank] * state.L.s[:rank])
                                                     @ state.L.Vh[:rank])[extra].half().float(), atol=1e-3)


def test_refit_keeps_the_structure_and_moves_closer_to_the_trained_weights(trained):
    model, _, ckpt = trained
    plain, refit = extract(ckpt, 0.5), extract(ckpt, 0.5, fit="refit")
    assert refit.salr_metadata["config"]["extraction"]["fit"] == "refit"
    for (name, a), (_, b) in zip(iter_sparse_lowrank(plain), iter_sparse_lowrank(refit)):
        assert torch.equal(a.salr_mask, b.salr_mask) and a.total_rank == b.total_rank
        x = model.get_submodule(name).weight.detach()
        error = lambda m: float((x - m.weight - m.get_delta_weight()).detach().norm())  # noqa: E731
        assert error(b) <= error(a) + 1e-4, name


def _cut_error(x, module):
    return float((x - module.weight - module.get_delta_weight()).detach().norm())


@pytest.mark.parametrize("budget", [0.5, 0.85])  # below and above the trained structure
def test_project_keeps_the_planned_counts_and_moves_closer_to_the_trained_weights(trained, budget):
    model, _, ckpt = trained
    plain, projected = extract(ckpt, budget), extract(ckpt, budget, fit="project")
    assert projected.salr_metadata["config"]["extraction"]["fit"] == "project"
    plan = projected.salr_metadata["config"]["extraction"]
    assert plan["bytes"] == plain.salr_metadata["config"]["extraction"]["bytes"]
    for (name, a), (_, b) in zip(iter_sparse_lowrank(plain), iter_sparse_lowrank(projected)):
        assert a.total_rank == b.total_rank and int(a.salr_mask.sum()) == int(b.salr_mask.sum()), name
        x = model.get_submodule(name).weight.detach()
        assert _cut_error(x, b) <= _cut_error(x, a) + 1e-3, name


def test_extract_rejects_an_unknown_fit(trained):
    with pytest.raises(ValueError, match="fit must be one of none, refit, project, got 'best'"):
        extract(trained[2], 0.5, fit="best")


def test_one_projection_from_zero_is_magnitude_pruning_plus_the_svd_of_the_residual():
    torch.manual_seed(0)
    x, rank, nnz = torch.randn(40, 70), 3, 900
    u, sigma, vh, _ = project_to(x, torch.zeros(40, rank), torch.zeros(rank), torch.zeros(rank, 70), nnz, 1)
    largest = torch.zeros(2800, dtype=torch.bool)
    largest[torch.topk(x.abs().flatten(), nnz).indices] = True
    ref_u, ref_s, ref_vh = torch.linalg.svd(torch.where(largest.reshape(40, 70), 0.0, x), full_matrices=False)
    assert torch.allclose((u * sigma) @ vh, (ref_u[:, :rank] * ref_s[:rank]) @ ref_vh[:rank], atol=1e-4)


def test_projection_error_never_rises_with_more_iterations():
    torch.manual_seed(1)
    x = torch.randn(50, 30) @ torch.randn(30, 60) / 30 + torch.randn(50, 60)
    rank, nnz = 4, 1200
    zeros = (torch.zeros(50, rank), torch.zeros(rank), torch.zeros(rank, 60))
    errors = [projection_error(x, *project_to(x, *zeros, nnz, it, tol=0.0)) for it in (1, 2, 4, 8)]
    assert all(b <= a + 1e-4 for a, b in zip(errors, errors[1:])) and errors[-1] < errors[0]


def test_projection_recovers_an_exact_low_rank_plus_sparse_matrix():
    torch.manual_seed(2)
    low = torch.randn(60, 2) @ torch.randn(2, 80)
    spikes = torch.zeros(4800)
    spikes[torch.randperm(4800)[:240]] = 20 * torch.sign(torch.randn(240))
    x = low + spikes.reshape(60, 80)
    zeros = (torch.zeros(60, 2), torch.zeros(2), torch.zeros(2, 80))
    assert projection_error(x, *project_to(x, *zeros, 240, iterations=30, tol=0.0)) < 1e-3 * float(x.norm())


def test_best_projection_keeps_the_start_with_the_lower_error():
    torch.manual_seed(3)
    x = torch.randn(50, 30) @ torch.randn(30, 60) / 30 + torch.randn(50, 60)
    rank, nnz = 4, 1000
    u, sigma, vh = torch.randn(50, rank), 5 * torch.rand(rank), torch.randn(rank, 60)  # a poor cut L
    starts = [project_to(x, u, sigma, vh, nnz), project_to(x, u, torch.zeros(rank), vh, nnz)]
    best = projection_error(x, *project_best(x, u, sigma, vh, nnz))
    assert best == pytest.approx(min(projection_error(x, *r) for r in starts), rel=1e-6)


def test_best_projection_is_never_worse_than_magnitude_pruning_plus_svd():
    torch.manual_seed(4)
    x = torch.randn(40, 70)
    rank, nnz = 3, 900
    baseline = project_to(x, torch.zeros(40, rank), torch.zeros(rank), torch.zeros(rank, 70), nnz, 1)
    u, sigma, vh = torch.randn(40, rank), torch.rand(rank), torch.randn(rank, 70)
    assert projection_error(x, *project_best(x, u, sigma, vh, nnz)) <= projection_error(x, *baseline) + 1e-4
