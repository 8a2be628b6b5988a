"""ATE by posterior predictive (evaluate/ate.py and the modules it assembles: data_stats,
predictive, streams, ate_memory), PPC export and plots."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive

from pyro_perturb.data import PerturbationData, simulate
from pyro_perturb.distributions import dosage_offset
from pyro_perturb.evaluate.data_stats import data_ate, representable_labels, treatment_splits
from pyro_perturb.evaluate.predictive import model_ate
from pyro_perturb.models.sams_vae import CPAVAEModel
from pyro_perturb.normalize import lognormalize
from pyro_perturb.registry import build

from .devices import run_device_clean

SMALL = dict(n_latent=6, n_hidden=16)


@pytest.fixture(scope="module")
def combo_adata():
    # doubles held out of training: test cells are only combinations
    return simulate.combinatorial(
        seed=1, n_singles=5, n_doubles=6, cells_per_perturbation=30, n_control_cells=80,
        n_genes=30, n_latent=4, frac_combinations_train=0.5, n_ate_draws=200,
    )


@pytest.fixture()
def combo_data(combo_adata):
    return PerturbationData.from_anndata(combo_adata)


def _pair(name, data):
    pyro.set_rng_seed(0)
    return build(name, data.spec, SMALL, gene_stats=data.gene_stats("train"))[:2]


def test_data_ate_by_hand():
    import anndata as ad
    import scipy.sparse as sp

    x = np.array([[10, 0, 0], [0, 10, 0], [5, 5, 0], [1, 1, 8], [2, 2, 6]], dtype=np.float32)
    obs = pd.DataFrame({"perturbation": ["control", "control", "A", "A+B", "A+B"],
                        "split": ["val", "val", "test", "test", "test"]},
                       index=[f"c{i}" for i in range(5)])
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs)
    adata.var_names = ["g0", "g1", "g2"]
    data = PerturbationData.from_anndata(adata, require_expressed_genes=False)
    ate, n = data_ate(data, cells="all")
    ln = np.log2(1 + x / x.sum(1, keepdims=True) * 1e4)
    control = ln[:2].mean(0)
    assert list(ate.index) == ["A", "A+B"]
    np.testing.assert_allclose(ate.loc["A"], ln[2] - control, rtol=1e-6)
    np.testing.assert_allclose(ate.loc["A+B"], ln[3:].mean(0) - control, rtol=1e-6)
    assert n["A+B"] == 2


def test_treatment_splits(combo_data, combo_adata):
    splits = treatment_splits(combo_data)
    info = combo_adata.uns["split_info"]
    for lab in info["test_combinations"]:
        assert splits[lab] == "test"
    for lab in info["train_combinations"]:
        assert splits[lab] == "train"
    assert splits["p000"] == "train"


def test_untreated_dosage_has_zero_ate(combo_data):
    model, guide = _pair("sams_vae", combo_data)
    ate = model_ate(model, guide, combo_data.spec, ["control", "p000"], num_particles=3000, seed=0)
    # Monte Carlo error only: the control against itself
    assert np.abs(ate.loc["control"].to_numpy()).mean() < 0.03
    assert np.abs(ate.loc["control"].to_numpy()).mean() < 0.5 * np.abs(ate.loc["p000"].to_numpy()).mean()


def test_ate_is_seeded_and_chunking_invariant_in_distribution(combo_data):
    model, guide = _pair("cpa_vae", combo_data)
    labs = ["p000", "p001+p002"]
    a = model_ate(model, guide, combo_data.spec, labs, num_particles=400, seed=3)
    b = model_ate(model, guide, combo_data.spec, labs, num_particles=400, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = model_ate(model, guide, combo_data.spec, labs, num_particles=400, seed=3, treatment_batch=1, particle_batch=50)
    assert np.abs(a.to_numpy() - c.to_numpy()).mean() < 0.1


def test_combination_ate_equals_composed_prediction(combo_data, combo_adata):
    """Model ATE of a held-out double = ATE computed by hand from d_A + d_B."""
    model, guide = _pair("sams_vae", combo_data)
    held_out = combo_adata.uns["split_info"]["test_combinations"][0]
    a, b = held_out.split("+")
    P = 4000
    ate = model_ate(model, guide, combo_data.spec, [held_out], num_particles=P, seed=0).loc[held_out].to_numpy()
    # by hand: globals from the guide, z_basal from the prior, composed offset
    spec = combo_data.spec
    d = torch.zeros(2, spec.n_perturbations)
    d[1, spec.perturbations.index(a)] = 1
    d[1, spec.perturbations.index(b)] = 1
    pyro.set_rng_seed(1)
    with torch.no_grad(), pyro.plate("particles", P, dim=-2):
        batch = replace(combo_data.batch(np.arange(2)), x=None, d=d, library=torch.full((2,), 1e4))
        gtrace = poutine.trace(guide).get_trace(batch)
        effect = gtrace.nodes["E"]["value"] * gtrace.nodes["M"]["value"]
        z = torch.randn(P, 2, SMALL["n_latent"]) + dosage_offset(d, effect)
        x = model.likelihood.distribution(model.decoder(z), batch.library).sample()
    ln = lognormalize(x.double()).mean(0).numpy()
    by_hand = ln[1] - ln[0]
    assert np.corrcoef(ate, by_hand)[0, 1] > 0.9
    assert np.abs(ate - by_hand).mean() < 0.05


class _OneHotOnly(CPAVAEModel):
    composes = False


def test_non_composing_model_gets_null_with_note(combo_data, combo_adata):
    model, guide = _pair("cpa_vae", combo_data)
    one_hot = _OneHotOnly(combo_data.spec, **SMALL)
    ok, notes = representable_labels(one_hot, combo_data, ["p000", *combo_adata.uns["split_info"]["test_combinations"]])
    assert ok == ["p000"]
    assert all("compose" in why for why in notes.values())
    ok2, notes2 = representable_labels(model, combo_data, ["p000", *combo_adata.uns["split_info"]["test_combinations"]])
    assert not notes2 and len(ok2) == 1 + len(combo_adata.uns["split_info"]["test_combinations"])


def test_ate_default_device_clean(combo_data):
    model, guide = _pair("sams_vae", combo_data)
    out = run_device_clean(model_ate, model, guide, combo_data.spec, ["p000", "p000+p001"], num_particles=20, seed=0)
    assert np.isfinite(out.to_numpy()).all()
    from pyro_perturb.evaluate.ppc import posterior_predictive_check

    idata = run_device_clean(posterior_predictive_check, model, guide, combo_data, num_draws=3, max_cells=5)
    assert "ate" in idata.posterior_predictive


def test_evaluate_writes_ate_outputs(tmp_path, combo_adata):
    import pyro_perturb as pp
    from pyro_perturb.evaluate import write_metrics

    run = pp.fit(combo_adata, model="sams_vae", max_epochs=2, **SMALL)
    res = run.evaluate(run.data, num_particles=5, out_dir=tmp_path, ate_particles=50, ppc_draws=4)
    write_metrics(res, tmp_path / "metrics.json")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("all", "train", "test"):
        for key in ("ate_pearson", "ate_r2", "ate_pearson_top20", "ate_r2_top20"):
            assert key in metrics["ate"][split]
    assert metrics["test"]["ate_n_treatments"] == len(combo_adata.uns["split_info"]["test_combinations"])
    assert "vs_true_ate" in metrics["ate"]
    model_csv = pd.read_csv(tmp_path / "ate_model.csv", index_col=0)
    data_csv = pd.read_csv(tmp_path / "ate_data.csv", index_col=0)
    assert list(model_csv.columns) == list(run.spec.genes)
    assert set(data_csv.index) <= set(model_csv.index)
    for png in ("ate_scatter.png", "ppc_zero_fraction.png", "mask_heatmap.png"):
        assert (tmp_path / png).stat().st_size > 1000
    import arviz as az

    # the facade: any combination of known singles, in any order
    one = run.ate(["p001+p000"], num_particles=20)
    assert list(one.index) == ["p000+p001"] and one.shape == (1, run.spec.n_genes)
    idata = az.from_netcdf(str(tmp_path / "ppc.nc"), engine="h5netcdf")
    assert set(idata.groups()) >= {"posterior_predictive", "observed_data"}
    assert idata.posterior_predictive["zero_fraction"].shape[:2] == (1, 4)


# ----------------------------------------------------------------------------- batching, memory
from pyro_perturb.evaluate.ate_memory import (  # noqa: E402
    ate_batch_for_memory,
    ate_working_memory,
    guide_hidden_width,
    widest_layer,
)
from pyro_perturb.evaluate.streams import RowStream, row_seed  # noqa: E402


@pytest.mark.parametrize("estimator", ["integrated", "sampled"])
def test_ate_is_bit_identical_whatever_the_batching(combo_data, estimator):
    """Each label draws from its own (seed, particle block, label) stream and the globals
    from (seed, block): treatment batch, memory budget, threads and the other labels asked
    change nothing: bit for bit with the sampled estimator, to float rounding with the
    integrated one."""
    model, guide = _pair("sams_vae", combo_data)
    spec = combo_data.spec
    labs = ["p000", "p001+p002", "p003", "control"]
    ref = model_ate(model, guide, spec, labs, num_particles=150, seed=5, particle_batch=40, estimator=estimator)
    one = model_ate(model, guide, spec, labs, num_particles=150, seed=5, particle_batch=40, treatment_batch=1, num_threads=1, estimator=estimator)
    sizes = dict(hidden=widest_layer(model, exclude=spec.n_genes), guide_hidden=guide_hidden_width(guide))
    budget = ate_working_memory(2, 40, spec.n_genes, 6, spec.n_perturbations, 2, **sizes) / 2**20
    assert ate_batch_for_memory(budget, 4, 40, spec.n_genes, 6, spec.n_perturbations, 2, **sizes) == (2, 40)
    small = model_ate(model, guide, spec, labs, num_particles=150, seed=5, particle_batch=40, memory_mb=budget, num_threads=2, estimator=estimator)
    subset = model_ate(model, guide, spec, ["p003", "p000"], num_particles=150, seed=5, particle_batch=40, estimator=estimator)
    # integrated: to float rounding (the decoder's multi-threaded float32 products may round a
    # row differently in another batch; sampled counts are integers and absorb it)
    same = (pd.testing.assert_frame_equal if estimator == "sampled"
            else lambda a, b: np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-6))
    same(ref, one)
    same(ref, small)
    same(ref.loc[["p003", "p000"]], subset)
    assert (ref.loc["control"] == 0).all()  # the control against its own draws
    assert np.abs(ref.loc["p000"]).mean() > 0
    other_seed = model_ate(model, guide, spec, ["p000"], num_particles=150, seed=6, particle_batch=40, estimator=estimator)
    assert not np.array_equal(other_seed.to_numpy(), ref.loc[["p000"]].to_numpy())


def _pyro_sampled_ate(model, guide, spec, labels, num_particles, seed):
    """The model ATE with every site drawn by Pyro from torch's generator (no row streams):
    one ``Predictive`` over the control and the labels, whose rows share the globals."""
    model.eval()
    guide.eval()
    pyro.set_rng_seed(seed)
    rows = [spec.control, *labels]
    batch = spec.request_batch(rows, 1e4)
    with torch.no_grad():
        predictive = Predictive(model, guide=guide, num_samples=num_particles, parallel=True, return_sites=("x",))
        x = predictive(batch, observe=False)["x"].reshape(num_particles, len(rows), spec.n_genes)
    means = lognormalize(x.double()).mean(0).numpy()
    return pd.DataFrame(means[1:] - means[0], index=pd.Index(labels, name="perturbation"), columns=spec.genes)


def test_row_streams_match_pyro_sampling_in_distribution(combo_data):
    """The per-row streams and Pyro's own sampling estimate the same ATE."""
    model, guide = _pair("sams_vae", combo_data)
    labs = ["p000", "p001+p002"]
    rows = model_ate(model, guide, combo_data.spec, labs, num_particles=3000, seed=0, particle_batch=500)
    pyro_ = _pyro_sampled_ate(model, guide, combo_data.spec, labs, num_particles=3000, seed=1)
    assert np.corrcoef(rows.to_numpy().ravel(), pyro_.to_numpy().ravel())[0, 1] > 0.9
    assert np.abs(rows.to_numpy() - pyro_.to_numpy()).mean() < 0.05


def test_row_stream_negative_binomial_is_torchs_nb():
    """Moments of the row sampler's NB against NB(theta, mean) and seeded repeatability."""
    theta = torch.tensor([0.5, 3.0, 20.0]).expand(60000, 3)
    mean = torch.tensor([0.3, 8.0, 150.0]).expand(60000, 3)
    logits = (mean / theta).log()
    x = RowStream(row_seed(0, 0, "A"), torch.device("cpu")).negative_binomial(theta, logits)
    again = RowStream(row_seed(0, 0, "A"), torch.device("cpu")).negative_binomial(theta, logits)
    assert torch.equal(x, again)
    m, v = x.double().mean(0), x.double().var(0)
    true_var = mean[0] + mean[0] ** 2 / theta[0]
    np.testing.assert_allclose(m.numpy(), mean[0].numpy(), rtol=0.03)
    np.testing.assert_allclose(v.numpy(), true_var.numpy(), rtol=0.1)


def test_treatment_batch_from_memory_budget():
    args = dict(n_rows=701, particles=100, n_genes=1187, n_latent=100, n_treatments=700, n_threads=2)
    budgets = [240, 300, 400, 512, 1024, 4096, 1e6]
    batches = [ate_batch_for_memory(mb, **args) for mb in budgets]
    particles = [p for _, p in batches]
    full_rows = [r for r, p in batches if p == 100]
    # more budget: never fewer particles per block; at the full block, never fewer rows
    assert particles == sorted(particles) and full_rows == sorted(full_rows) and len(full_rows) >= 3
    assert batches[-1] == (701, 100) and all(r >= 1 for r, _ in batches)
    for mb, (r, p) in zip(budgets, batches):
        assert ate_working_memory(r, p, 1187, 100, 700, 2) <= mb * 2**20
        if r < 701:  # the largest that fits: one more row would not
            assert ate_working_memory(r + 1, p, 1187, 100, 700, 2) > mb * 2**20
    # below one row of 100 particles the particles per step shrink
    r, p = ate_batch_for_memory(240, **args)
    assert r >= 1 and 1 <= p < 100 and ate_working_memory(r, p, 1187, 100, 700, 2) <= 240 * 2**20
    with pytest.raises(ValueError, match="at least"):
        ate_batch_for_memory(100, **args)  # below the fixed part


def test_model_ate_rejects_bad_options(combo_data):
    model, guide = _pair("cpa_vae", combo_data)
    with pytest.raises(ValueError, match="memory budget"):
        model_ate(model, guide, combo_data.spec, ["p000"], num_particles=10, memory_mb=1e-6)
    with pytest.raises(ValueError, match="particle_batch"):
        model_ate(model, guide, combo_data.spec, ["p000"], num_particles=10, particle_batch=0)


def test_rows_share_basal_noise_but_not_count_noise():
    """Common random numbers: every request row of a particle block draws the same basal
    (normal) noise, so the ATE difference carries no basal-state noise; counts stay per row."""
    import numpy as np

    shared = np.random.SeedSequence([0, 3, 1])
    a = RowStream(row_seed(0, 3, "A"), torch.device("cpu"), shared)
    b = RowStream(row_seed(0, 3, "A+B"), torch.device("cpu"), shared)
    loc, scale = torch.zeros(50, 4), torch.ones(50, 4)
    assert torch.equal(a.normal(loc, scale), b.normal(loc, scale))
    rate = torch.full((50, 4), 5.0)
    assert not torch.equal(a.poisson(rate), b.poisson(rate))
    other_block = RowStream(row_seed(0, 4, "A"), torch.device("cpu"), np.random.SeedSequence([0, 4, 1]))
    assert not torch.equal(other_block.normal(loc, scale), RowStream(row_seed(0, 3, "A"), torch.device("cpu"), shared).normal(loc, scale))


def test_failed_netcdf_export_warns_and_the_rest_is_written(tmp_path, monkeypatch, combo_data):
    """An optional export that fails says so (file and error) instead of vanishing."""
    import arviz as az

    from pyro_perturb.evaluate.ate import ate_evaluator

    def fail(self, *args, **kwargs):
        (tmp_path / "ppc.nc").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(az.InferenceData, "to_netcdf", fail)
    model, guide = _pair("sams_vae", combo_data)
    run = SimpleNamespace(model=model, guide=guide, device=torch.device("cpu"), name="sams_vae")
    results = {"train": {}, "test": {}}
    with pytest.warns(RuntimeWarning, match=r"ppc\.nc.*OSError: disk full"):
        ate_evaluator(run, combo_data, results, tmp_path, seed=0,
                      options={"ate_particles": 20, "ppc_draws": 2, "ate_plots": False})
    assert not (tmp_path / "ppc.nc").exists()  # no partial file left behind
    assert (tmp_path / "ate_model.csv").exists() and "ate_pearson" in results["ate"]["all"]
