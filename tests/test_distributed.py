"""Data-parallel training: 2 gloo CPU processes launched by torchrun against one process.

The reference and the ranks run ``tests/ddp_worker.py``: a model whose guide is a Delta
(no particle noise), so two ranks at per-rank batch B/2 must reproduce the losses and
parameters of one process at batch B, and the zoo's ``cvae`` (stochastic guide), whose
parameters must stay identical across the ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_perturb.infer import distributed
from pyro_perturb.infer.distributed import DistContext

WORKER = Path(__file__).with_name("ddp_worker.py")


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_gloo_ranks_match_single_process_training(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    launch = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]

    # the single-process reference, in this process
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    sys.path.insert(0, str(WORKER.parent))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    threads = torch.get_num_threads()
    try:
        ddp_worker.main(tmp_path)
    finally:
        torch.set_num_threads(threads)

    single, rank0, rank1 = (_load(tmp_path / name) for name in ("rank0_1.pt", "rank0_2.pt", "rank1_2.pt"))
    assert (rank0["world_size"], rank1["world_size"], rank1["rank"]) == (2, 2, 1)

    # each rank read half of every batch of the single process, the halves disjoint
    assert len(single["toy_cells_read"]) == len(rank0["toy_cells_read"]) == len(rank1["toy_cells_read"]) == 18
    for whole, half0, half1 in zip(single["toy_cells_read"], rank0["toy_cells_read"], rank1["toy_cells_read"]):
        assert len(half0) == len(half1) == len(whole) // 2
        assert sorted(half0 + half1) == whole

    # deterministic guide: same losses and parameters as one process at the total batch size
    assert len(single["toy_history"]) == len(rank0["toy_history"]) == 3
    for one, two in zip(single["toy_history"], rank0["toy_history"]):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    for name, value in single["toy_params"].items():
        torch.testing.assert_close(rank0["toy_params"][name], value, rtol=1e-4, atol=1e-5)
    # and training moved them well beyond that tolerance (not two copies of the init)
    torch.manual_seed(0)
    init = ddp_worker.DeterministicModel().state_dict()  # the worker's initial decoder
    assert (rank0["toy_params"]["decoder.weight"] - init["decoder.weight"]).abs().max() > 1e-2

    # the ranks hold identical parameters (bit for bit), for both models
    for part in ("toy_params", "cvae_params", "fcr_params"):
        for name, value in rank0[part].items():
            assert torch.equal(value, rank1[part][name]), (part, name)
    # FCR's discriminator (own optimiser) is among them, and it trained
    assert rank0["fcr_adversary_keys"]
    for name, init in rank0["fcr_adversary_init"].items():
        assert not torch.equal(rank0["fcr_params"]["adversary." + name], init), name
    losses = [[(r["train_loss"], r["val_loss"]) for r in res["cvae_history"]] for res in (rank0, rank1)]
    assert losses[0] == losses[1]  # all-reduced: every rank logs the same figures

    # rank 0 wrote the run directory; the checkpoint holds both ranks' RNG states, which
    # differ (each rank draws its own particle noise)
    ckpt = torch.load(tmp_path / "cvae_run_2" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["rng_torch_ranks"]) == 2
    assert not torch.equal(ckpt["rng_torch_ranks"][0], ckpt["rng_torch_ranks"][1])
    assert {"checkpoint.pt", "history.csv"} <= set(rank0["run_dir_files"])


def test_adversary_optimizer_averages_gradients_only_when_distributed(monkeypatch):
    adversary = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(adversary.parameters(), lr=1.0)
    assert distributed.adversary_optimizer(opt, DistContext()) is opt
    assert distributed.adversary_optimizer(None, DistContext(rank=0, world_size=2)) is None
    wrapped = distributed.adversary_optimizer(opt, DistContext(rank=0, world_size=2))
    # a fake all-reduce: the other rank's gradient is 3 times this one's
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t.mul_(4.0))
    adversary.weight.grad = torch.ones_like(adversary.weight)
    adversary.bias.grad = None  # unused on this rank: joins the average as zeros
    before = adversary.weight.detach().clone()
    wrapped.step()
    torch.testing.assert_close(adversary.weight.detach(), before - 2.0)  # mean of 1 and 3
    assert wrapped.state_dict() == opt.state_dict() and wrapped.param_groups is opt.param_groups


def test_single_process_context_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_from_env("cpu")
    assert ctx == DistContext() and ctx.shard is None and ctx.is_main
    elbo, aux = object(), object()
    assert distributed.data_parallel_loss(None, None, elbo, aux, ctx) == (elbo, aux)
    assert distributed.all_reduce_sum([1.5, 2.0], ctx, torch.device("cpu")) == [1.5, 2.0]
