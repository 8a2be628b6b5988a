"""Model effects (evaluate/predictive.py): the integrated and the sampled estimator, depth
(fixed and observed library pools, evaluate/depth.py), and counterfactual cells
(``Run.sample``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyro
import pytest
import torch

import pyro_perturb as pp
from pyro_perturb.data import PerturbationData, simulate
from pyro_perturb.evaluate import predictive
from pyro_perturb.evaluate.data_stats import representable_labels
from pyro_perturb.evaluate.predictive import model_ate, model_effects, sample_cells
from pyro_perturb.registry import build, list_models

from .devices import TEST_DEVICE, run_device_clean
from .test_zoo_contract import SMALL_SIMS, _hparams

SHALLOW_MEDIAN = 150.0  # a shallow library (UMIs per cell)


@pytest.fixture(scope="module")
def zoo_data():
    out = {}
    for name, sizes in SMALL_SIMS.items():
        adata, options = pp.run.builtin_data(name, seed=0, **sizes)
        out[name] = PerturbationData.from_anndata(adata, **options)
    return out


@pytest.fixture(scope="module")
def zoo(zoo_data):
    """name -> (model, guide, data, labels): every registered model, tiny and untrained."""
    out = {}
    for entry in list_models():
        data = zoo_data[entry.default_data]
        out[entry.name] = _pair(entry.name, data, _hparams(entry))
    return out


def _pair(name, data, hparams):
    pyro.set_rng_seed(0)
    model, guide, _ = build(name, data.spec, hparams, gene_stats=data.gene_stats("train"))
    train_labels = [lab for lab in data.spec.labels[1:] if lab in set(data.label_names(data.indices("train")))]
    labels, _ = representable_labels(model, data, train_labels[:2])
    return model, guide, data, labels


def _pools(rows, median=SHALLOW_MEDIAN, seed=0):
    rng = np.random.default_rng(seed)
    return {lab: rng.lognormal(np.log(median), 0.6, 200) for lab in rows}


def _per_particle(model, guide, spec, rows, library, num_particles, seed=0):
    """Per particle and row, the integrated and the sampled statistic of the same latents
    (the same draws as ``model_effects``): ``(rows, particles, G)`` arrays each."""
    integrated = [[] for _ in rows]
    sampled = [[] for _ in rows]

    def record(start, site, libraries, streams, for_each_row):
        for r, stream in enumerate(streams):
            row_libraries = None if libraries is None else libraries[:, r]
            integrated[start + r].append(site.lognorm_row(r, row_libraries, stream, "integrated").double().numpy())
            sampled[start + r].append(site.lognorm_row(r, row_libraries, stream, "sampled").double().numpy())

    with torch.no_grad():
        predictive._run_steps(model, guide, spec, rows, record, num_particles=num_particles, seed=seed,
                             device=torch.device("cpu"), library=library, covariate_codes=None, treatment_batch=None,
                             particle_batch=100, memory_mb=None, num_threads=1)
    return np.stack([np.concatenate(v) for v in integrated]), np.stack([np.concatenate(v) for v in sampled])


ZOO_CASES = [entry.name for entry in list_models()]


@pytest.mark.parametrize("name", ZOO_CASES + ["cvae_poisson", "cvae_gaussian"])
def test_integrated_and_sampled_agree_within_monte_carlo_error(name, zoo, zoo_data):
    """The integrated estimator is the sampled one's expectation: with the same latents,
    their per-gene difference (mean level and ATE) is within a few Monte Carlo standard
    errors of the sampled one, at library 1e4 and at shallow observed pools."""
    if name in zoo:
        model, guide, data, labels = zoo[name]
    else:
        data = zoo_data["combinatorial"]
        model, guide, data, labels = _pair("cvae", data, {"n_latent": 4, "n_hidden": 16, "likelihood": name.split("_")[1]})
    spec = data.spec
    rows = [spec.control, *labels]
    P = 400
    for library in (1e4, _pools(rows)):
        integrated, sampled = _per_particle(model, guide, spec, rows, library, P)
        diff = sampled - integrated  # (rows, P, G): count noise only
        ate_diff = diff[1:] - diff[:1]
        for d in (diff, ate_diff):
            se = d.std(1, ddof=1) / np.sqrt(P)
            z = d.mean(1) / np.where(se > 0, se, np.inf)
            assert np.abs(z).max() < 5.5, (name, library if np.isscalar(library) else "pools")
            assert (z**2).mean() < 2.0, (name, (z**2).mean())
        # model_effects computes the same two means
        for estimator, values in (("integrated", integrated), ("sampled", sampled)):
            eff = model_effects(model, guide, spec, labels, library=library, num_particles=P, estimator=estimator,
                                num_threads=1)
            np.testing.assert_allclose(eff.lognorm_mean.to_numpy(), values.mean(1), rtol=0, atol=1e-9)
            np.testing.assert_allclose(eff.ate.to_numpy(), values.mean(1)[1:] - values.mean(1)[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ZOO_CASES)
def test_library_rescaling_is_exact(name, zoo):
    """Pools run the model at 1e4 and rescale its expected counts: the same as running it
    at that library (nothing in a model but the likelihood's mean sees the library)."""
    model, guide, data, labels = zoo[name]
    rows = [data.spec.control, *labels]
    at_300 = model_effects(model, guide, data.spec, labels, library=300.0, num_particles=30)
    pooled = model_effects(model, guide, data.spec, labels, library={lab: np.array([300.0]) for lab in rows},
                           num_particles=30)
    np.testing.assert_allclose(pooled.lognorm_mean.to_numpy(), at_300.lognorm_mean.to_numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(pooled.normalized_mean.to_numpy(), at_300.normalized_mean.to_numpy(), rtol=1e-4)
    assert at_300.library == "fixed 300" and pooled.library.startswith("observed (pools: ")


@pytest.mark.parametrize("estimator", ["integrated", "sampled"])
def test_effects_bit_identical_whatever_the_batching_with_pools(estimator, zoo_data):
    """With observed pools too, a label's values depend only on (seed, label): not on the
    treatment batch, the threads or the other labels."""
    data = zoo_data["combinatorial"]
    model, guide, _, _ = _pair("sams_vae", data, {"n_latent": 4, "n_hidden": 16})
    spec = data.spec
    labs = ["p000", "p001+p002", "p003", spec.control]
    pools = _pools([spec.control, *labs])
    kw = dict(library=pools, num_particles=90, seed=4, particle_batch=40, estimator=estimator)
    ref = model_effects(model, guide, spec, labs, **kw)
    one = model_effects(model, guide, spec, labs, treatment_batch=1, num_threads=1, **kw)
    two = model_effects(model, guide, spec, labs, treatment_batch=2, num_threads=2, **kw)
    subset = model_effects(model, guide, spec, ["p003"], **kw)
    # sampled: bit-identical. Integrated: the decoder's float32 matrix products may round a
    # row differently when the batch (and so the BLAS blocking) changes with several
    # threads, and the integrated value carries that rounding through (sampled counts are
    # integers and do not): identical to float rounding.
    same = (pd.testing.assert_frame_equal if estimator == "sampled"
            else lambda a, b: np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-6))
    for other in (one, two):
        same(ref.ate, other.ate)
        same(ref.lognorm_mean, other.lognorm_mean)
        same(ref.normalized_mean, other.normalized_mean)
    same(ref.ate.loc[["p003"]], subset.ate)
    if estimator == "integrated":  # every row of a step in one call (the CUDA default): the same to rounding
        at_once = model_effects(model, guide, spec, labs, treatment_batch=3, rows_at_once=True, **kw)
        np.testing.assert_allclose(at_once.ate.to_numpy(), ref.ate.to_numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(at_once.normalized_mean.to_numpy(), ref.normalized_mean.to_numpy(), rtol=1e-5)
    assert (ref.ate.loc[spec.control] == 0).all() and np.abs(ref.ate.loc["p000"]).mean() > 0
    assert list(ref.lognorm_mean.index) == [spec.control, "p000", "p001+p002", "p003"]
    assert ref.estimator == estimator and ref.num_particles == 90
    np.testing.assert_allclose(ref.normalized_mean.sum(1), 1e4, rtol=1e-5)  # 1e4 * rho sums to 1e4


def test_effects_reject_bad_options(zoo_data):
    data = zoo_data["combinatorial"]
    model, guide, _, _ = _pair("cpa_vae", data, {"n_latent": 4, "n_hidden": 16})
    spec = data.spec
    with pytest.raises(ValueError, match="no pool of library sizes for 'p000'"):
        model_effects(model, guide, spec, ["p000"], library={spec.control: np.array([100.0])}, num_particles=5)
    with pytest.raises(ValueError, match="positive library sizes"):
        model_effects(model, guide, spec, ["p000"], library={spec.control: [100.0], "p000": [0.0]}, num_particles=5)
    with pytest.raises(ValueError, match="positive number"):
        model_ate(model, guide, spec, ["p000"], num_particles=5, library=-1.0)
    with pytest.raises(ValueError, match="unknown estimator"):
        model_effects(model, guide, spec, ["p000"], num_particles=5, estimator="exact")
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        model_effects(model, guide, spec, ["p_unknown"], num_particles=5)


def test_gaussian_likelihood_effects_and_no_cells(zoo_data):
    """The Gaussian likelihood models log1p(1e4 x / l): its statistic is depth-free, and it
    has no counts to draw cells from."""
    data = zoo_data["combinatorial"]
    model, guide, _, labels = _pair("cvae", data, {"n_latent": 4, "n_hidden": 16, "likelihood": "gaussian"})
    rows = [data.spec.control, *labels]
    fixed = model_effects(model, guide, data.spec, labels, num_particles=20)
    pooled = model_effects(model, guide, data.spec, labels, num_particles=20, library=_pools(rows))
    pd.testing.assert_frame_equal(fixed.lognorm_mean, pooled.lognorm_mean)
    with pytest.raises(ValueError, match="not counts"):
        sample_cells(model, guide, data.spec, labels, 3)


def test_effects_default_device_clean(zoo_data):
    """Both estimators, library pools and cell draws create no tensor on the default
    device (run on ``PYRO_PERTURB_TEST_DEVICE``)."""
    data = zoo_data["combinatorial"]
    model, guide, _, labels = _pair("sams_vae", data, {"n_latent": 4, "n_hidden": 16})
    pools = _pools([data.spec.control, *labels])
    for estimator in ("integrated", "sampled"):
        for library in (1e4, pools):
            eff = run_device_clean(model_effects, model, guide, data.spec, labels, num_particles=12, particle_batch=5,
                                   estimator=estimator, library=library)
            assert np.isfinite(eff.ate.to_numpy()).all() and np.isfinite(eff.normalized_mean.to_numpy()).all()
    cells = run_device_clean(sample_cells, model, guide, data.spec, labels, 7, library=pools)
    assert cells[labels[0]][0].shape == (7, data.spec.n_genes)
    assert next(model.parameters()).device.type == TEST_DEVICE.type


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    adata = simulate.combinatorial(seed=1, n_singles=4, n_doubles=2, cells_per_perturbation=30, n_control_cells=60,
                                   n_genes=30, n_ate_draws=10, depth="shallow")
    path = tmp_path_factory.mktemp("effects") / "run"
    run = pp.fit(adata, model="sams_vae", out=path, max_epochs=1, n_latent=3, n_hidden=8, progress=False)
    return adata, run, path


def test_run_stores_training_depths_and_predicts_at_them(fitted):
    adata, run, path = fitted
    stored = json.loads((path / "config.json").read_text())["library_sizes"]
    data = run.data
    train = data.indices("train")
    assert stored["all"]["n_cells"] == len(train) and len(stored["all"]["quantiles"]) == 101
    np.testing.assert_allclose(stored["all"]["quantiles"][50], np.median(data.library[train]), atol=0.01)
    control = data.spec.control
    n_control = int((data.label_names(train) == control).sum())
    assert stored["labels"][control]["n_cells"] == n_control
    loaded = pp.load_run(path)
    observed = loaded.effects(["p000+p001", "p002"], num_particles=40)
    assert observed.library.startswith("observed") and observed.estimator == "integrated"
    pd.testing.assert_frame_equal(observed.ate, run.ate(["p001+p000", "p002"], num_particles=40))
    fixed = loaded.ate(["p002"], num_particles=40, library=1e4)
    assert not np.allclose(fixed.to_numpy(), observed.ate.loc[["p002"]].to_numpy())
    # a run saved before the depths were stored: a clear error, or the data's training cells
    loaded.library_sizes = None
    with pytest.raises(ValueError, match=r"library=1e4"):
        loaded.ate(["p002"], num_particles=5)
    from_data = loaded.ate(["p000+p001", "p002"], num_particles=40, data=adata)
    np.testing.assert_allclose(from_data.to_numpy(), observed.ate.to_numpy(), atol=1e-3)
    # basal states from the training control cells of the data
    controls = run.effects(["p002"], num_particles=40, data=adata, basal="controls")
    n_train_controls = int((data.label_names(train) == control).sum())
    assert controls.basal == f"control cells ({n_train_controls})"
    assert not np.allclose(controls.ate.to_numpy(), observed.ate.loc[["p002"]].to_numpy())
    with pytest.raises(ValueError, match="needs data"):
        run.ate(["p002"], num_particles=5, basal="controls")


def test_run_sample_cells(fitted):
    adata, run, _ = fitted
    cells = run.sample(["p002", "p001+p000"], n_cells=25, seed=3)
    assert cells.shape == (50, run.spec.n_genes) and list(cells.var_names) == run.spec.genes
    assert list(cells.obs["perturbation"].cat.categories) == ["p002", "p000+p001"]
    x = cells.X.toarray()
    assert x.dtype == np.float32 and np.array_equal(x, np.round(x)) and (x >= 0).all()
    # observed depth: shallow libraries drawn from the training cells of the label
    totals = x.sum(1)
    assert 30 < np.median(totals) < 600 and np.corrcoef(totals, cells.obs["library_size"])[0, 1] > 0.5
    # a label's cells do not depend on the other labels asked
    alone = run.sample(["p002"], n_cells=25, seed=3)
    np.testing.assert_array_equal(alone.X.toarray(), x[:25])
    assert not np.array_equal(run.sample(["p002"], n_cells=25, seed=4).X.toarray(), x[:25])
    with pytest.raises(ValueError, match="vocabulary"):
        run.sample(["p_unknown"], n_cells=2)


def _control_cells(data):
    train = data.indices("train")
    return predictive.ControlCells(data, train[data.label_names(train) == data.spec.control])


@pytest.mark.parametrize("name", ["sams_vae", "cvae"])
def test_basal_from_control_cells_bit_identical_and_the_guides_draws(name, zoo_data):
    """``basal=ControlCells``: a label's values depend only on (seed, label), and each
    particle's basal state is the guide's posterior draw for one control cell: decoding it
    under the control dosage reproduces that cell's posterior predictive."""
    data = zoo_data["combinatorial"]
    model, guide, _, _ = _pair(name, data, {"n_latent": 4, "n_hidden": 16})
    spec = data.spec
    cells = _control_cells(data)
    labs = ["p000", "p001+p002", "p003"]
    kw = dict(library=_pools([spec.control, *labs]), num_particles=60, seed=3, particle_batch=25, basal=cells)
    ref = model_effects(model, guide, spec, labs, **kw)
    one = model_effects(model, guide, spec, labs, treatment_batch=1, num_threads=1, **kw)
    pd.testing.assert_frame_equal(ref.ate, one.ate)
    pd.testing.assert_frame_equal(ref.ate.loc[["p003"]], model_effects(model, guide, spec, ["p003"], **kw).ate)
    assert ref.basal == f"control cells ({len(cells.indices)})"
    prior = model_effects(model, guide, spec, labs, **{**kw, "basal": "prior"})
    assert prior.basal == "prior" and not np.allclose(prior.ate.to_numpy(), ref.ate.to_numpy())
    # one control cell: every particle's basal value is a guide draw for that cell
    one_cell = predictive.ControlCells(data, cells.indices[:1])
    values = predictive._basal_values(guide, model, one_cell, np.random.SeedSequence(0), 5, torch.device("cpu"))
    (site,) = pp.contract.basal_sites(model)
    assert values[site].shape == (5, 4)
    batch = data.batch(np.repeat(cells.indices[:1], 5))
    pyro.set_rng_seed(0)
    loc = guide.posterior_latents(data.batch(cells.indices[:1]))["X_basal" if name == "sams_vae" else "X_latent"]
    # draws scatter around the cell's posterior mean (not the prior's 0)
    assert torch.allclose(values[site].mean(0), loc[0], atol=1.5)
    assert batch.x.shape[0] == 5


def test_basal_controls_refused_for_models_without_basal_sites(zoo_data):
    data = zoo_data["sparse_shift"]
    model, guide, _, labels = _pair("svae_plus", data, {"n_latent": 4, "n_hidden": 16})
    with pytest.raises(ValueError, match="basal sites"):
        model_effects(model, guide, data.spec, labels, num_particles=4, basal=_control_cells(data))
    with pytest.raises(ValueError, match="basal must be"):
        model_effects(model, guide, data.spec, labels, num_particles=4, basal="controls")
