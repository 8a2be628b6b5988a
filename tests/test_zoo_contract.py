"""Every registered (model, guide) pair honours the zoo's contract: it trains on its built-in
kind of data, is device clean, round-trips through a run directory, predicts latents and is
evaluated by held-out IWELBO (on ``PYRO_PERTURB_TEST_DEVICE``, default cpu: see tests/devices.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyro_perturb as pp
from pyro_perturb.registry import build, list_models

from .devices import TEST_DEVICE, assert_device_clean

SMALL_SIMS = {
    "combinatorial": dict(n_singles=4, n_doubles=2, cells_per_perturbation=25, n_control_cells=50, n_genes=30, n_ate_draws=20),
    "sparse_shift": dict(n_latent=4, n_perturbations=6, cells_per_perturbation=25, n_control_cells=25, n_genes=30, n_heldout=2),
    "factorized": dict(n_covariates=2, n_treatments=3, cells_per_group=20, n_genes=30, n_heldout_pairs=1),
}
TINY_HP = {"n_latent": 4, "n_hidden": 16}
NAMES = [entry.name for entry in list_models()]


@pytest.fixture(scope="module")
def datasets():
    out = {}
    for name, sizes in SMALL_SIMS.items():
        adata, options = pp.run.builtin_data(name, seed=0, **sizes)
        out[name] = (adata, options)
    return out


def _hparams(entry):
    known = entry.hyperparameters()
    hp = {k: v for k, v in TINY_HP.items() if k in known}
    if "n_latent" in hp and entry.default_data == "factorized":
        hp.pop("n_latent")
    return hp


@pytest.mark.parametrize("name", NAMES)
def test_contract(name, datasets, tmp_path):
    entry = pp.registry.get_entry(name)
    adata, options = datasets[entry.default_data]
    data = pp.PerturbationData.from_anndata(adata, **options)
    model, guide, _ = build(name, data.spec, _hparams(entry), gene_stats=data.gene_stats())
    assert getattr(model, "max_plate_nesting", None) is not None
    batch = data.batch(data.indices("train")[:12], n_cells=len(data.indices("train")))
    assert_device_clean(model, guide, batch)

    run = pp.fit(data, model=name, out=tmp_path / "run", max_epochs=2, batch_size=64, progress=False,
                 device=TEST_DEVICE.type, **_hparams(entry))
    assert all(np.isfinite(r["train_loss"]) for r in run.history)
    loaded = pp.load_run(tmp_path / "run", device=TEST_DEVICE.type)
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    latents = loaded.latents(data)
    assert latents["X_latent"].shape[0] == data.n_cells and np.isfinite(latents["X_latent"]).all()
    values = loaded.iwelbo(data, "test", num_particles=3)
    assert values.shape == (len(data.indices("test")),) and np.isfinite(values).all()
