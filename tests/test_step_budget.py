"""Training budgets in optimizer steps: ``max_steps`` (mid-epoch included, resumable),
validation every ``val_every_steps`` steps with early stopping, the history's ``step``
column, runs written before steps were logged, and the registry's step-based defaults."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import pyro_perturb as pp
from pyro_perturb.cli import main
from pyro_perturb.infer import engine
from pyro_perturb.infer.checkpoint import load_checkpoint, save_checkpoint
from pyro_perturb.infer.engine import TrainConfig, validation_loss
from pyro_perturb.registry import DEFAULT_CELLS_SEEN, get_entry

SMALL = dict(n_latent=4, n_hidden=32, progress=False, device="cpu")


def _steps_per_epoch(data, batch_size: int) -> int:
    return -(-len(data.indices("train")) // batch_size)


@pytest.fixture()
def count_steps(monkeypatch):
    """Counts the engine's optimizer steps; ``calls["stop_at"] = n`` interrupts the n-th."""
    calls = {"n": 0, "stop_at": None}
    real_step = engine.training_step

    def counting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "training_step", counting_step)
    return calls


def _same_parameters(a: dict, b: dict) -> None:
    for part in ("model", "guide"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_max_steps_stops_mid_epoch_and_logs_steps(tiny_data, tmp_path, count_steps):
    assert _steps_per_epoch(tiny_data, 64) == 5
    run = pp.fit(tiny_data, model="cvae", out=tmp_path / "r", max_steps=7, batch_size=64, **SMALL)
    assert count_steps["n"] == 7
    # the full first epoch, then the two steps of the second where the budget ran out
    assert [(r["epoch"], r["step"]) for r in run.history] == [(1, 5), (2, 7)]
    ckpt = load_checkpoint(tmp_path / "r")
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (1, 2, 7)
    csv = pd.read_csv(tmp_path / "r" / "history.csv")
    assert list(csv.columns) == engine.HISTORY_FIELDS and csv["step"].tolist() == [5, 7]
    assert [r["step"] for r in pp.load_run(tmp_path / "r").history] == [5, 7]
    assert run.train_config.max_epochs == 100  # the second cap, not reached


def test_resume_mid_epoch_with_max_steps_matches_uninterrupted(tiny_data, tmp_path, count_steps):
    settings = dict(max_steps=13, batch_size=64, seed=3, checkpoint_every_steps=2, early_stopping_patience=None,
                    **SMALL)
    full = pp.fit(tiny_data, model="cvae", out=tmp_path / "full", **settings)
    count_steps.update(n=0, stop_at=10)  # inside epoch 2, after its step-4 checkpoint (step 9 overall)
    with pytest.raises(KeyboardInterrupt):
        pp.fit(tiny_data, model="cvae", out=tmp_path / "cut", **settings)
    ckpt = load_checkpoint(tmp_path / "cut")
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (1, 4, 9)

    count_steps.update(n=0, stop_at=None)
    resumed = pp.fit(tiny_data, model="cvae", out=tmp_path / "cut", resume=True)
    assert count_steps["n"] == 13 - 9  # no step redone, none beyond the budget
    a, b = load_checkpoint(tmp_path / "cut"), load_checkpoint(tmp_path / "full")
    assert (a["epoch"], a["step"], a["global_step"]) == (b["epoch"], b["step"], b["global_step"]) == (2, 3, 13)
    _same_parameters(a, b)
    for key in ("epoch", "step", "train_loss", "val_loss"):
        assert [r[key] for r in resumed.history] == [r[key] for r in full.history], key

    # raising the budget continues the same trajectory as a run given the larger budget at once
    pp.fit(tiny_data, model="cvae", out=tmp_path / "full", resume=True, max_steps=18)
    pp.fit(tiny_data, model="cvae", out=tmp_path / "once", **{**settings, "max_steps": 18})
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "once")
    assert a["global_step"] == b["global_step"] == 18
    for part in ("model", "guide"):  # the current parameters (the best state may differ: more rows)
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_val_every_steps_early_stops_inside_an_epoch(tiny_data, count_steps):
    """One epoch of 40 steps validated every 4: with an improvement threshold no later
    validation can meet, training stops at the third validation and keeps the first's state."""
    assert _steps_per_epoch(tiny_data, 8) == 40
    run = pp.fit(tiny_data, model="cvae", max_epochs=1, batch_size=8, val_every_steps=4, early_stopping_patience=2,
                 min_delta=1e6, **SMALL)
    assert count_steps["n"] == 12
    assert [(r["epoch"], r["step"]) for r in run.history] == [(1, 4), (1, 8), (1, 12)]
    now = validation_loss(run.model, run.guide, tiny_data, "val", run.train_config, torch.device("cpu"),
                          seed=run.train_config.seed + 7919)
    assert now == pytest.approx(run.history[0]["val_loss"], rel=1e-5)


def test_val_every_steps_adds_rows_only_inside_longer_epochs(tiny_data):
    settings = dict(max_epochs=2, batch_size=64, seed=1, **SMALL)  # 5 steps per epoch
    plain = pp.fit(tiny_data, model="cvae", **settings)
    same = pp.fit(tiny_data, model="cvae", val_every_steps=5, **settings)
    assert [(r["step"], r["val_loss"]) for r in same.history] == [(r["step"], r["val_loss"]) for r in plain.history]
    finer = pp.fit(tiny_data, model="cvae", val_every_steps=2, **settings)
    assert [(r["epoch"], r["step"]) for r in finer.history] == [(1, 2), (1, 4), (1, 5), (2, 7), (2, 9), (2, 10)]
    # validation forks the RNG: the training trajectory, hence each epoch's loss, is the same
    assert [r["train_loss"] for r in finer.history if r["step"] % 5 == 0] == [r["train_loss"] for r in plain.history]


def test_runs_written_before_steps_were_logged_still_load_and_resume(tiny_adata, tmp_path):
    data_path = tmp_path / "d.h5ad"
    tiny_adata.write_h5ad(data_path)
    run_dir = tmp_path / "old"
    pp.fit(str(data_path), model="cvae", out=run_dir, max_epochs=2, batch_size=64, **SMALL)
    # rewrite the run as an earlier version wrote it: no step counts, source inside "data"
    ckpt = load_checkpoint(run_dir)
    del ckpt["global_step"]
    for row in ckpt["history"]:
        del row["step"]
    save_checkpoint(ckpt, run_dir)
    history = pd.read_csv(run_dir / "history.csv").drop(columns="step")
    history.to_csv(run_dir / "history.csv", index=False)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["data"]["source"] = cfg.pop("data_source")
    for key in ("max_steps", "val_every_steps"):
        del cfg["train"][key]
    (run_dir / "config.json").write_text(json.dumps(cfg))

    loaded = pp.load_run(run_dir)
    assert loaded.data_source == {"path": str(data_path.resolve()), "backed": False}
    assert "source" not in loaded.data_options and loaded.train_config.max_steps is None
    assert loaded.data.n_cells == tiny_adata.n_obs
    loaded.save(tmp_path / "copy")  # a history without steps is written with empty cells
    assert pd.read_csv(tmp_path / "copy" / "history.csv")["step"].isna().all()

    resumed = pp.fit(out=run_dir, model="cvae", resume=True, max_epochs=3)  # data: from the old source
    assert [r["step"] for r in resumed.history] == [5, 10, 15]
    assert load_checkpoint(run_dir)["global_step"] == 15
    assert "source" not in json.loads((run_dir / "config.json").read_text())["data"]


def test_registry_defaults_are_a_step_budget_and_explicit_epochs_are_not(tiny_data):
    for name in ("cvae", "sams_vae", "svae_plus", "fcr"):
        defaults = TrainConfig(**get_entry(name).train_defaults)
        assert defaults.max_steps == DEFAULT_CELLS_SEEN // defaults.batch_size
        assert defaults.val_every_steps == defaults.max_steps // 20 and defaults.max_epochs == 100
    run = pp.fit(tiny_data, model="cvae", max_steps=3, batch_size=64, **SMALL)
    assert (run.train_config.max_epochs, run.train_config.val_every_steps) == (100, 200)
    assert run.history[-1]["step"] == 3
    # an explicit epoch budget alone trains as before step budgets existed
    run = pp.fit(tiny_data, model="cvae", max_epochs=1, batch_size=64, **SMALL)
    assert run.train_config.max_steps is None and run.train_config.val_every_steps is None
    run = pp.fit(tiny_data, model="cvae", max_epochs=2, max_steps=3, batch_size=64, **SMALL)
    assert run.history[-1]["step"] == 3 and run.train_config.val_every_steps == 200


@pytest.mark.parametrize("bad", [{"max_steps": 0}, {"val_every_steps": 0}])
def test_train_config_refuses_bad_step_budgets(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_cli_max_steps_and_resume_with_a_larger_budget(tiny_adata, tmp_path, capsys):
    data_path = tmp_path / "d.h5ad"
    tiny_adata.write_h5ad(data_path)
    run_dir = tmp_path / "run"
    args = ["fit", "--model", "cvae", "--data", str(data_path), "--out", str(run_dir), "--max-steps", "3",
            "--batch-size", "64", "--n-latent", "2", "--set", "n_hidden=8", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert "3 optimizer steps" in capsys.readouterr().out
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 3
    assert main(["fit", "--model", "cvae", "--out", str(run_dir), "--resume", "--max-steps", "7", "--quiet"]) == 0
    assert pd.read_csv(run_dir / "history.csv")["step"].tolist() == [3, 5, 7]
