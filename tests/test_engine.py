"""The SVI engine: learning, IWELBO, resume, determinism, NaN detection, run directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyro_perturb as pp
from pyro_perturb.infer import TrainConfig, TrainingDivergedError, iwelbo
from pyro_perturb.infer.checkpoint import load_checkpoint, safe_load
from pyro_perturb.registry import build

from .devices import TEST_DEVICE, assert_device_clean, run_device_clean

SMALL = dict(n_latent=4, n_hidden=32, batch_size=64, progress=False)


def params(run):
    return {k: v.clone() for k, v in {**run.model.state_dict(), **{"g." + k: v for k, v in run.guide.state_dict().items()}}.items()}


def test_learning_beats_untrained(tiny_data):
    model, guide, _ = build("cvae", tiny_data.spec, {"n_latent": 4, "n_hidden": 32}, gene_stats=tiny_data.gene_stats())
    before = iwelbo(model, guide, tiny_data, "test", num_particles=20).mean()
    run = pp.fit(tiny_data, model="cvae", max_epochs=30, lr=3e-3, **SMALL)
    losses = [r["train_loss"] for r in run.history]
    assert losses[-1] < losses[0] - 10
    after = run.iwelbo(tiny_data, "test", num_particles=20).mean()
    assert after > before + 20, (before, after)


def test_iwelbo_bounds_elbo_and_grows_with_particles(tiny_data):
    run = pp.fit(tiny_data, model="cvae", max_epochs=10, lr=3e-3, **SMALL)
    one = run.iwelbo(tiny_data, "test", num_particles=1).mean()
    many = run.iwelbo(tiny_data, "test", num_particles=50).mean()
    assert many > one  # log-mean-exp over more particles tightens the bound
    # chunked particles and small batches give the same numbers as one pass
    a = iwelbo(run.model, run.guide, tiny_data, "test", 12, batch_size=7, particle_chunk=5, seed=3)
    b = iwelbo(run.model, run.guide, tiny_data, "test", 12, batch_size=7, particle_chunk=5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (len(tiny_data.indices("test")),)


def test_same_seed_identical_parameters(tiny_data):
    a = params(pp.fit(tiny_data, model="cvae", max_epochs=3, seed=5, **SMALL))
    b = params(pp.fit(tiny_data, model="cvae", max_epochs=3, seed=5, **SMALL))
    c = params(pp.fit(tiny_data, model="cvae", max_epochs=3, seed=6, **SMALL))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    settings = dict(max_epochs=6, seed=2, early_stopping_patience=None, **SMALL)
    full = pp.fit(tiny_data, model="cvae", out=tmp_path / "full", **settings)

    class Killed(Exception):
        pass

    def kill_after_3(epoch, row):
        if epoch == 3:
            raise Killed

    with pytest.raises(Killed):
        pp.fit(tiny_data, model="cvae", out=tmp_path / "cut", callback=kill_after_3, **settings)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 3
    resumed = pp.fit(tiny_data, model="cvae", out=tmp_path / "cut", resume=True, max_epochs=6)
    a, b = params(full), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(resumed.history) == 6
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_refuses_to_overwrite_a_run(tiny_data, tmp_path):
    pp.fit(tiny_data, model="cvae", out=tmp_path / "r", max_epochs=1, **SMALL)
    with pytest.raises(ValueError, match="already holds a run"):
        pp.fit(tiny_data, model="cvae", out=tmp_path / "r", max_epochs=1, **SMALL)


def test_nan_loss_stops_with_last_good_state(tiny_data, tmp_path):
    good = {}

    def poison(epoch, row):
        # after epoch 2 is checkpointed, corrupt a weight so the next step's loss is NaN
        good.update({k: v.clone() for k, v in run_ref["model"].state_dict().items()})
        if epoch == 2:
            with torch.no_grad():
                run_ref["model"].likelihood.log_theta.fill_(float("nan"))

    run_ref = {}
    original_build = pp.run.build

    def capture_build(*args, **kwargs):
        model, guide, hp = original_build(*args, **kwargs)
        run_ref["model"] = model
        return model, guide, hp

    pp.run.build = capture_build
    try:
        with pytest.raises(TrainingDivergedError, match="epoch 3"):
            pp.fit(tiny_data, model="cvae", out=tmp_path / "nan", callback=poison, max_epochs=5, **SMALL)
    finally:
        pp.run.build = original_build
    state = run_ref["model"].state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert load_checkpoint(tmp_path / "nan")["epoch"] == 2


def test_early_stopping_keeps_best(tiny_data):
    run = pp.fit(tiny_data, model="cvae", max_epochs=200, lr=3e-2, early_stopping_patience=2, **SMALL)
    assert len(run.history) < 200
    vals = [r["val_loss"] for r in run.history]
    from pyro_perturb.infer.engine import validation_loss

    now = validation_loss(run.model, run.guide, tiny_data, "val", run.train_config, torch.device("cpu"), seed=run.train_config.seed + 7919)
    assert now == pytest.approx(min(vals), rel=1e-5)


def test_kl_warmup_schedule():
    from pyro_perturb.infer.engine import kl_weight_at

    weights = [kl_weight_at(e, 4) for e in range(6)]
    assert weights[0] > 0 and weights == sorted(weights) and weights[-1] == 1.0
    assert kl_weight_at(0, 0) == 1.0


def test_run_directory_round_trip(tiny_data, tmp_path):
    run = pp.fit(tiny_data, model="cvae", out=tmp_path / "run", max_epochs=2, **SMALL)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"] == "cvae" and cfg["spec"]["genes"] == tiny_data.spec.genes
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert set(weights) == {"model", "guide", "sha256"}  # plain tensors plus a content digest
    assert (tmp_path / "run" / "history.csv").read_text().startswith("epoch,train_loss,val_loss")
    loaded = pp.load_run(tmp_path / "run")
    a, b = params(run), params(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_allclose(
        loaded.iwelbo(tiny_data.adata, "test", 5, seed=1), run.iwelbo(tiny_data, "test", 5, seed=1), rtol=1e-5
    )
    out = loaded.predict(tiny_data.adata)
    assert out.obsm["X_latent"].shape == (tiny_data.n_cells, 4)


def test_tampered_and_truncated_weights_are_refused(tiny_data, tmp_path):
    pp.fit(tiny_data, model="cvae", out=tmp_path / "run", max_epochs=2, **SMALL)
    path = tmp_path / "run" / "model.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    import pickle

    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(ValueError, match="not a valid pyro-perturb weights file"):
        pp.load_run(tmp_path / "run")
    # a truncated latest checkpoint falls back to the previous one
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.warns(UserWarning, match="resuming from"):
        state = load_checkpoint(tmp_path / "run")
    assert state["epoch"] == 1
    with pytest.raises(ValueError):
        safe_load(ckpt)


def test_unknown_settings_are_named(tiny_data):
    with pytest.raises(ValueError, match="no setting|unknown setting 'n_latnet'"):
        pp.fit(tiny_data, model="cvae", n_latnet=3)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        pp.fit(tiny_data, model="nope")
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="no CUDA" if not torch.cuda.is_available() else "x^"):
        pp.fit(tiny_data, model="cvae", device="cuda", max_epochs=1)


def test_cvae_and_evaluation_are_device_clean(tiny_data):
    model, guide, _ = build("cvae", tiny_data.spec, {"n_latent": 4, "n_hidden": 8})
    batch = tiny_data.batch(tiny_data.indices("train")[:16], n_cells=100)
    assert_device_clean(model, guide, batch)
    values = run_device_clean(iwelbo, model, guide, tiny_data, "test", 4, device=TEST_DEVICE)
    assert np.isfinite(values).all()


def test_latents_of_chosen_cells_keep_their_order(tiny_data):
    run = pp.fit(tiny_data, model="cvae", max_epochs=1, **SMALL)
    everything = run.latents(tiny_data)["X_latent"]
    chosen = np.array([40, 3, 17, 3])
    np.testing.assert_allclose(run.latents(tiny_data, batch_size=3, indices=chosen)["X_latent"], everything[chosen], rtol=1e-5)


def test_flipped_byte_inside_a_checkpoint_is_caught(tiny_data, tmp_path):
    """torch.load alone would return the corrupted tensor silently; the digest catches it."""
    pp.fit(tiny_data, model="cvae", out=tmp_path / "run", max_epochs=2, **SMALL)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    raw = bytearray(ckpt.read_bytes())
    intact = torch.load(ckpt, weights_only=True)
    # flip one byte of the largest tensor's storage (its bytes sit verbatim in the zip)
    name, tensor = max(intact["model"].items(), key=lambda kv: kv[1].numel())
    needle = tensor.reshape(-1)[: tensor.numel() // 2 + 4].numpy().tobytes()[-16:]
    at = bytes(raw).find(needle)
    assert at > 0, "tensor bytes not found verbatim in the checkpoint"
    raw[at + 3] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    loaded = torch.load(ckpt, weights_only=True)  # torch does not notice
    assert not torch.equal(loaded["model"][name], tensor)
    with pytest.raises(ValueError, match="corrupted"):
        safe_load(ckpt)
    with pytest.warns(UserWarning, match="resuming from"):
        state = load_checkpoint(tmp_path / "run")
    assert state["epoch"] == 1
    # a run directory's model.pt is checked the same way
    weights = tmp_path / "run" / "model.pt"
    assert "sha256" in torch.load(weights, weights_only=True)
    assert set(pp.load_run(tmp_path / "run").model.state_dict()) == set(intact["model"])
