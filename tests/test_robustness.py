"""A training process killed with SIGKILL resumes from its last checkpoint and ends with the
same parameters as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_perturb.cli import main
from pyro_perturb.data import simulate


def _write_data(tmp_path):
    data = tmp_path / "d.h5ad"
    simulate.combinatorial(
        seed=3, n_singles=4, n_doubles=2, cells_per_perturbation=150, n_control_cells=300, n_genes=30, n_ate_draws=20
    ).write_h5ad(data)
    return data


def _kill_after_first_checkpoint(args, out, poll: float, settle: float, longer: str) -> None:
    """Run ``pyro-perturb ARGS --out OUT`` in a subprocess and SIGKILL it ``settle``
    seconds after its first checkpoint appears."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pyro_perturb.cli", *args, "--out", str(out)], env=env)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(poll)
    time.sleep(settle)
    if proc.poll() is not None:
        pytest.fail(f"training finished before it could be killed; make {longer} longer")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _resume_and_run_uninterrupted(args, killed, full) -> tuple[dict, dict]:
    """Resume the killed run, train an uninterrupted one, return both final checkpoints."""
    # same thread count as the killed process: float sums must be reduced in the same order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["fit", "--model", "cvae", "--out", str(killed), "--resume", "--quiet"]) == 0
        assert main([*args, "--out", str(full)]) == 0
    finally:
        torch.set_num_threads(threads)
    return (torch.load(killed / "checkpoint.pt", weights_only=True), torch.load(full / "checkpoint.pt", weights_only=True))


def _assert_same_parameters(a: dict, b: dict) -> None:
    for part in ("model", "guide"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
    data = _write_data(tmp_path)
    args = ["fit", "--model", "cvae", "--data", str(data), "--max-epochs", "8", "--batch-size", "16",
            "--seed", "4", "--n-latent", "3", "--set", "n_hidden=16", "--set", "early_stopping_patience=None",
            "--device", "cpu", "--quiet"]
    killed = tmp_path / "killed"
    # killed somewhere inside a later epoch (or a checkpoint write)
    _kill_after_first_checkpoint(args, killed, poll=0.02, settle=0.15, longer="the epochs")
    epoch_at_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= epoch_at_kill < 8

    a, b = _resume_and_run_uninterrupted(args, killed, tmp_path / "full")
    assert a["epoch"] == b["epoch"] == 8
    _assert_same_parameters(a, b)
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_epoch_backed_then_resume_matches_uninterrupted(tmp_path):
    """One long epoch read backed from disk, checkpointed every few steps: a SIGKILL
    inside the epoch loses at most those steps, and the resumed run ends as an
    uninterrupted one."""
    data = _write_data(tmp_path)
    args = ["fit", "--model", "cvae", "--data", str(data), "--backed", "--max-epochs", "1", "--batch-size", "4",
            "--seed", "4", "--n-latent", "3", "--set", "n_hidden=16", "--set", "checkpoint_every_steps=20",
            "--set", "shuffle_block_size=16", "--device", "cpu", "--quiet"]
    killed = tmp_path / "killed"
    _kill_after_first_checkpoint(args, killed, poll=0.01, settle=0.1, longer="the epoch")
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] > 0 and ckpt["step"] % 20 == 0  # inside the only epoch

    a, b = _resume_and_run_uninterrupted(args, killed, tmp_path / "full")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (1, 0)
    _assert_same_parameters(a, b)
    assert [r["train_loss"] for r in a["history"]] == pytest.approx([r["train_loss"] for r in b["history"]], rel=1e-12)
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]
