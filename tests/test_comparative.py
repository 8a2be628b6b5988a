"""Comparative VAEs (contrastive VAE, MO-cVAE, CO-cVAE), their simulator and block metrics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from pyro import poutine

import pyro_perturb as pp
from pyro_perturb.cli import main
from pyro_perturb.data.simulate import comparative
from pyro_perturb.data.simulate_comparative import comparative_proportions
from pyro_perturb.evaluate.blocks import block_metrics, block_recovery_metrics, leakage_r2
from pyro_perturb.evaluate.metrics import mcc
from pyro_perturb.hsic import normalized_hsic
from pyro_perturb.models.comparative import SALIENT_SITE, min_norm_weight
from pyro_perturb.registry import build, get_entry, list_models

NAMES = ("contrastive_vae", "mo_cvae", "co_cvae")
SMALL = dict(n_background=3, n_salient=2, n_perturbations=3, n_control_cells=300, cells_per_perturbation=100, n_genes=40)
TINY_HP = dict(n_background=3, n_salient=2, n_hidden=32)


@pytest.fixture(scope="module")
def small():
    adata = comparative(seed=0, **SMALL)
    return adata, pp.PerturbationData.from_anndata(adata)


def _pair(name, data, **hp):
    torch.manual_seed(0)
    model, guide, _ = build(name, data.spec, {**TINY_HP, **hp}, gene_stats=data.gene_stats())
    return model, guide


def _batch(data, n=64):
    idx = data.indices("train")
    return data.batch(np.sort(np.random.default_rng(0).choice(idx, n, replace=False)), n_cells=len(idx))


def test_registered(small):
    names = {e.name for e in list_models()}
    assert set(NAMES) <= names
    for name in NAMES:
        entry = get_entry(name)
        assert entry.default_data == "comparative"
        hp = entry.hyperparameters()
        assert hp["n_background"] == 10 and hp["n_salient"] == 5 and hp["likelihood"] == "nb"
    assert get_entry("co_cvae").hyperparameters()["independence_level"] == 0.05
    with pytest.raises(ValueError, match="independence_level"):
        build("co_cvae", small[1].spec, {"independence_level": 2.0})


@pytest.mark.parametrize("name", NAMES)
def test_salient_is_zero_for_controls_in_traces(name, small):
    _, data = small
    model, guide = _pair(name, data)
    batch = _batch(data)
    control = (batch.label == 0).numpy()
    assert control.any() and (~control).any()
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    z_s = model_trace.nodes[SALIENT_SITE]["value"].detach().numpy()
    assert np.all(z_s[control] == 0) and np.all(np.abs(z_s[~control]).sum(-1) > 0)
    # drawn from the prior (posterior predictive): still zero for controls
    prior = poutine.trace(model).get_trace(batch, observe=False)
    assert np.all(prior.nodes[SALIENT_SITE]["value"].detach().numpy()[control] == 0)
    lat = guide.posterior_latents(batch)
    assert set(lat) == {"X_latent", "X_background", "X_salient"}
    assert lat["X_latent"].shape == (batch.size, 5)
    assert torch.all(lat["X_salient"][torch.as_tensor(control)] == 0)


def test_min_norm_weight_simplex_and_min_norm():
    rng = np.random.default_rng(0)
    for _ in range(20):
        g_b, g_t = (torch.tensor(rng.standard_normal(5)) for _ in range(2))
        a = float(min_norm_weight(g_b, g_t))
        assert 0.0 <= a <= 1.0
        grid = np.linspace(0, 1, 2001)
        norms = [float((w * g_b + (1 - w) * g_t).norm()) for w in grid]
        assert float((a * g_b + (1 - a) * g_t).norm()) <= min(norms) + 1e-6
    # orthogonal unit gradients: equal weights; one gradient inside the other's cone: it wins
    assert float(min_norm_weight(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(0.5)
    assert float(min_norm_weight(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]))) == 1.0
    assert float(min_norm_weight(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))) == 0.5


def test_mo_training_loss_weights_the_two_elbos(small):
    _, data = small
    model, guide = _pair("mo_cvae", data)
    batch = _batch(data)
    elbo = pp.infer.engine.make_elbo("trace", 1, 1)
    loss = model.training_loss(elbo, guide, batch)
    assert torch.isfinite(loss) and loss.requires_grad
    assert 0.0 <= float(model.last_weight) <= 1.0
    loss.backward()  # the graph survives the two gradient evaluations


def test_co_multiplier_rises_when_violated_and_is_projected(small):
    _, data = small
    model, guide = _pair("co_cvae", data, independence_level=0.0, multiplier_lr=10.0)
    model.train()
    batch = _batch(data, 128)
    assert float(model.multiplier) == 0.0
    dep = float(model.dependence(guide, batch).detach())
    assert dep > 0  # two untrained encoders of the same counts are dependent
    model.auxiliary_loss(guide, batch)
    assert float(model.multiplier) == pytest.approx(10.0 * dep, rel=1e-4)
    before = float(model.multiplier)
    model.update_multiplier(0.5)
    assert float(model.multiplier) == pytest.approx(before + 5.0)
    model.update_multiplier(-1e6)  # satisfied: the multiplier decays, never below 0
    assert float(model.multiplier) == 0.0
    model.eval()  # evaluation does not move it
    model.auxiliary_loss(guide, batch)
    assert float(model.multiplier) == 0.0


def test_normalized_hsic_independent_vs_dependent():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 3, generator=g), torch.randn(200, 2, generator=g)
    assert abs(float(normalized_hsic(a, b))) < 0.05
    assert float(normalized_hsic(a, a[:, :2] + 0.1 * torch.randn(200, 2, generator=g))) > 0.5
    a.requires_grad_(True)
    normalized_hsic(a, b).backward()
    assert torch.isfinite(a.grad).all()


def test_simulator_shapes_and_truth(small):
    adata, _ = small
    n = SMALL["n_control_cells"] + SMALL["n_perturbations"] * SMALL["cells_per_perturbation"]
    assert adata.shape == (n, SMALL["n_genes"])
    gt = adata.uns["ground_truth"]
    assert gt["simulator"] == "comparative" and list(gt["perturbations"]) == ["pert_0", "pert_1", "pert_2"]
    assert list(gt["blocks"]["background"]) == [0, 3] and list(gt["blocks"]["salient"]) == [3, 5]
    z, zb, zs = adata.obsm["z_true"], adata.obsm["z_background_true"], adata.obsm["z_salient_true"]
    assert z.shape == (n, 5) and zb.shape == (n, 3) and zs.shape == (n, 2)
    np.testing.assert_array_equal(z, np.hstack([zb, zs]))
    control = (adata.obs["perturbation"] == "control").to_numpy()
    assert np.all(zs[control] == 0) and np.all(np.abs(zs[~control]).sum(1) > 0)
    # the salient means differ per label; the background does not
    means = np.stack([zs[(adata.obs["perturbation"] == p).to_numpy()].mean(0) for p in gt["perturbations"]])
    np.testing.assert_allclose(means, gt["salient_means"], atol=0.35)
    np.testing.assert_allclose(gt["shifts"][:, 3:], gt["salient_means"])
    assert set(adata.obs["split"]) == {"train", "val", "test"}
    assert (adata.obs["split"] == "test").mean() == pytest.approx(0.15, abs=0.02)
    rho = comparative_proportions(gt["decoder"], z[:4])
    np.testing.assert_allclose(rho.sum(1), 1.0)
    again = comparative(seed=0, **SMALL)
    assert (again.X != adata.X).nnz == 0
    smooth = comparative(seed=0, decoder="smooth", **SMALL)
    np.testing.assert_array_equal(smooth.obsm["z_true"], z)  # same latents, other decoder
    assert smooth.uns["ground_truth"]["decoder"]["activation"] == "smooth"
    with pytest.raises(ValueError, match="decoder"):
        comparative(decoder="sigmoid")
    with pytest.raises(ValueError, match="n_salient"):
        comparative(n_salient=0)


def test_block_metrics_perfect_and_swapped():
    rng = np.random.default_rng(0)
    n = 600
    tb, ts = rng.standard_normal((n, 3)), rng.standard_normal((n, 2))
    target = np.ones(n, dtype=bool)
    perfect = block_metrics(tb, ts, 2.0 * tb[:, ::-1] + 1.0, -ts, target)
    assert perfect["background_mcc"] == pytest.approx(1.0) and perfect["salient_mcc"] == pytest.approx(1.0)
    assert perfect["background_r2"] > 0.99 and perfect["salient_r2"] > 0.99
    assert perfect["leakage_background"] < 0.05 and perfect["leakage_salient"] < 0.05
    swapped = block_metrics(tb, ts, ts, tb, target)
    assert swapped["leakage_background"] > 0.7 and swapped["leakage_salient"] > 0.7
    assert swapped["background_mcc"] < 0.3
    assert leakage_r2(rng.standard_normal((n, 2)), ts) < 0.05
    with pytest.raises(ValueError, match="same rows"):
        leakage_r2(tb[:10], ts)


def test_short_fit_beats_chance_and_predict_writes_blocks(small, tmp_path):
    adata, data = small
    path = tmp_path / "cmp.h5ad"
    adata.write_h5ad(path)
    run = pp.fit(data, model="contrastive_vae", out=tmp_path / "run", max_epochs=60, batch_size=128, progress=False,
                 device="cpu", seed=0, **TINY_HP)
    m = block_recovery_metrics(run.latents(data), data)["val"]
    rng = np.random.default_rng(0)
    val = data.indices("val")
    chance = mcc(adata.obsm["z_background_true"][val], rng.standard_normal((len(val), 3)))
    assert m["background_mcc"] > chance + 0.2 and m["salient_mcc"] > 0.5
    results = run.evaluate(data, num_particles=2)
    assert {"background_mcc", "salient_mcc", "leakage_background", "leakage_salient"} <= set(results["val"])
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(tmp_path / "run"), "--data", str(path), "--out", str(out)]) == 0
    pred = ad.read_h5ad(out)
    assert pred.obsm["X_background"].shape == (adata.n_obs, 3) and pred.obsm["X_salient"].shape == (adata.n_obs, 2)
    control = (pred.obs["perturbation"] == "control").to_numpy()
    assert np.all(pred.obsm["X_salient"][control] == 0)
