import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from salr_edge.api import compress_
from salr_edge.config import SALRConfig
from salr_edge.modules.sparse_lowrank_linear import iter_sparse_lowrank
from salr_edge.training.finetune import FinetuneConfig, finetune, trainable_parameters
from tests.conftest import make_tiny_llama

TOKENS = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(1))


def _compressed():
    torch.manual_seed(0)
    model = make_tiny_llama()
    compress_(model, SALRConfig(sparsity=0.5, rank=4, lora_rank=4), show_progress=False)
    return model


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, log_every=1)
    base.update(kw)
    return FinetuneConfig(**base)


def test_base_stays_exactly_sparse_and_unchanged_after_finetuning():
    model = _compressed()
    before = {n: (m.weight.clone(), m.salr_mask.clone()) for n, m in iter_sparse_lowrank(model)}
    finetune(model, TOKENS, _cfg(), show_progress=False)
    for name, module in iter_sparse_lowrank(model):
        weight, mask = before[name]
        assert torch.equal(module.weight, weight)
        assert float((module.weight != 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        assert bool((module.weight[~mask] == 0).all())


def test_adapters_learn_and_loss_drops():
    model = _compressed()
    history = finetune(model, TOKENS[:300].repeat(8), _cfg(steps=20, lr=3e-2), show_progress=False)
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = _compressed()
    finetune(straight, TOKENS, _cfg(), show_progress=False)
    resumed = _compressed()
    finetune(resumed, TOKENS, _cfg(output_dir=str(tmp_path), max_minutes=0.0), show_progress=False)  # stops after 1 step
    resumed2 = _compressed()
    finetune(resumed2, TOKENS, _cfg(output_dir=str(tmp_path), resume=True), show_progress=False)
    for (name, a), b in zip(trainable_parameters(straight).items(), trainable_parameters(resumed2).values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_a_new_output_dir_is_created_for_the_trainer_state(tmp_path):
    out = tmp_path / "new" / "run"
    finetune(_compressed(), TOKENS, _cfg(output_dir=str(out), max_minutes=0.0), show_progress=False)
    assert (out / "trainer_state").is_dir()


def test_model_without_adapters_is_rejected():
    model = make_tiny_llama()
    compress_(model, SALRConfig(rank=0, lora_rank=0), show_progress=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        finetune(model, TOKENS, _cfg(), show_progress=False)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _compressed()
    finetune(model, TOKENS, _cfg(batch_size=2), show_progress=False)
    if rank == 0:
        torch.save({n: p.detach() for n, p in trainable_parameters(model).items()}, out)
    dist.destroy_process_group()


def test_ddp_on_two_gloo_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    single = _compressed()
    finetune(single, TOKENS, _cfg(batch_size=4), show_progress=False)
    ddp = torch.load(out, weights_only=True)
    for name, param in trainable_parameters(single).items():
        torch.testing.assert_close(ddp[name], param.detach(), atol=1e-5, rtol=1e-4, msg=name)
