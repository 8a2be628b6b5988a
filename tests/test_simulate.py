"""Tests of the simulators in pyro_perturb.data.simulate (small sizes: fast)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from pyro_perturb.data import simulate as sim

SMALL_SPARSE = dict(
    n_latent=5, n_perturbations=12, cells_per_perturbation=60, n_control_cells=80,
    n_genes=40, n_heldout=3, hidden=16,
)
SMALL_COMB = dict(
    n_latent=6, n_singles=8, n_doubles=10, cells_per_perturbation=40, n_control_cells=100,
    n_genes=50, hidden=16, n_ate_draws=300,
)
SMALL_FACT = dict(
    n_covariates=3, n_treatments=4, n_latent_x=2, n_latent_t=3, n_latent_tx=2,
    cells_per_group=40, n_genes=50, n_heldout_pairs=3, hidden=16,
)


@pytest.fixture(scope="module")
def sparse_data() -> ad.AnnData:
    return sim.sparse_shift(**SMALL_SPARSE, seed=0)


@pytest.fixture(scope="module")
def comb_data() -> ad.AnnData:
    return sim.combinatorial(**SMALL_COMB, seed=0)


@pytest.fixture(scope="module")
def fact_data() -> ad.AnnData:
    return sim.factorized(**SMALL_FACT, seed=0)


def _labels(adata: ad.AnnData, key: str = "perturbation") -> np.ndarray:
    return adata.obs[key].astype(str).to_numpy()


def _lognorm(adata: ad.AnnData) -> np.ndarray:
    x = adata.X.toarray().astype(np.float64)
    return np.log2(1.0 + x / x.sum(axis=1, keepdims=True) * 1e4)


def _check_contract(adata: ad.AnnData, n_latent: int) -> None:
    x = adata.X
    assert sp.isspmatrix_csr(x) or isinstance(x, sp.csr_array)
    assert x.dtype == np.float32
    n_cells, n_genes = adata.shape
    values = x.data
    assert np.all(values >= 0) and np.all(values == np.round(values))
    assert np.all(np.asarray(x.sum(axis=0)).ravel() > 0), "a gene is all-zero"
    assert list(adata.var_names[:2]) == ["gene_000", "gene_001"]
    assert list(adata.obs_names[:2]) == ["cell_00000", "cell_00001"]
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    labels = _labels(adata)
    assert all(isinstance(v, str) for v in labels)
    assert "control" in set(labels)
    for label in set(labels):
        if "+" in label:
            parts = label.split("+")
            assert parts == sorted(parts) and len(parts) == 2
    assert set(_labels(adata, "split")) <= {"train", "val", "test"}
    assert list(adata.obs["split"].cat.categories) == ["train", "val", "test"]
    z = adata.obsm["z_true"]
    assert z.dtype == np.float32 and z.shape == (n_cells, n_latent)
    gt = adata.uns["ground_truth"]
    for key in ("perturbations", "targets", "shifts", "simulator", "params"):
        assert key in gt
    n_pert = len(gt["perturbations"])
    assert gt["targets"].dtype == np.int8 and gt["targets"].shape == (n_pert, n_latent)
    assert gt["shifts"].dtype == np.float32 and gt["shifts"].shape == (n_pert, n_latent)
    # the shift is nonzero exactly where the latent is a target
    np.testing.assert_array_equal(gt["shifts"] != 0, gt["targets"] == 1)
    # the true decoder reproduces proportions that sum to one
    rho = sim.decoder_proportions(gt["decoder"], z[:5])
    assert rho.shape == (5, n_genes)
    np.testing.assert_allclose(rho.sum(axis=1), 1.0, rtol=1e-10)


def _roundtrip(adata: ad.AnnData, tmp_path) -> ad.AnnData:
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    return ad.read_h5ad(path)


def _assert_same_ground_truth(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_same_ground_truth(value, b[key])
        elif isinstance(value, (list, np.ndarray)):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(b[key]))
        else:
            assert value == b[key], key


# ------------------------------------------------------------------------ sparse_shift


def test_sparse_shift_contract(sparse_data):
    _check_contract(sparse_data, n_latent=5)
    gt = sparse_data.uns["ground_truth"]
    assert gt["simulator"] == "sparse_shift"
    assert gt["perturbations"] == [f"p{i:03d}" for i in range(12)]
    assert sparse_data.n_obs == 80 + 12 * 60
    n_targets = gt["targets"].sum(axis=1)
    assert n_targets.min() >= 1 and n_targets.max() <= 3
    magnitudes = np.abs(gt["shifts"][gt["targets"] == 1])
    assert magnitudes.min() > 3.0 and magnitudes.max() < 7.0


def test_sparse_shift_latent_means_match_shifts(sparse_data):
    gt = sparse_data.uns["ground_truth"]
    labels = _labels(sparse_data)
    z = sparse_data.obsm["z_true"]
    np.testing.assert_allclose(z[labels == "control"].mean(axis=0), 0.0, atol=0.4)
    for name, shift in zip(gt["perturbations"], gt["shifts"]):
        # 60 cells: standard error 0.13 per latent
        np.testing.assert_allclose(z[labels == name].mean(axis=0), shift, atol=0.5)


def test_sparse_shift_heldout(sparse_data):
    gt = sparse_data.uns["ground_truth"]
    heldout = list(gt["heldout"])
    assert len(heldout) == 3 and heldout == sorted(heldout)
    labels = _labels(sparse_data)
    split = _labels(sparse_data, "split")
    in_heldout = np.isin(labels, heldout)
    np.testing.assert_array_equal(sparse_data.obs["heldout"].to_numpy(), in_heldout)
    assert np.all(split[in_heldout] == "test")
    assert set(split[~in_heldout]) == {"train", "val"}
    # controls are in training; val is about 20 % of the non-held-out cells
    assert "train" in set(split[labels == "control"])
    assert abs((split == "val").sum() / (~in_heldout).sum() - 0.2) < 0.02


def test_sparse_shift_decoder_is_informative(sparse_data):
    # strongly shifted perturbations change mean log-normalised expression visibly
    lognorm = _lognorm(sparse_data)
    labels = _labels(sparse_data)
    control = lognorm[labels == "control"].mean(axis=0)
    effects = [
        np.abs(lognorm[labels == name].mean(axis=0) - control).max()
        for name in sparse_data.uns["ground_truth"]["perturbations"]
    ]
    assert np.median(effects) > 1.0  # log2 units: a two-fold change on some gene
    # and proportions are neither uniform nor one-hot
    rho = sim.decoder_proportions(sparse_data.uns["ground_truth"]["decoder"], sparse_data.obsm["z_true"])
    assert 0.002 < np.median(rho.max(axis=1)) < 0.5
    assert np.median(rho.max(axis=1) / rho.min(axis=1)) > 10


def test_sparse_shift_library_size(sparse_data):
    library = np.asarray(sparse_data.X.sum(axis=1)).ravel()
    assert 1500 < np.median(library) < 2600
    assert 0.2 < np.log(library).std() < 0.45


def test_sparse_shift_deterministic():
    a = sim.sparse_shift(**SMALL_SPARSE, seed=3)
    b = sim.sparse_shift(**SMALL_SPARSE, seed=3)
    c = sim.sparse_shift(**SMALL_SPARSE, seed=4)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    np.testing.assert_array_equal(a.obsm["z_true"], b.obsm["z_true"])
    assert (a.X != c.X).nnz > 0
    assert not np.array_equal(a.uns["ground_truth"]["targets"], c.uns["ground_truth"]["targets"]) or \
        not np.array_equal(a.obsm["z_true"], c.obsm["z_true"])


def test_sparse_shift_poisson_shares_latents(sparse_data):
    p = sim.sparse_shift(**SMALL_SPARSE, likelihood="poisson", seed=0)
    np.testing.assert_array_equal(p.obsm["z_true"], sparse_data.obsm["z_true"])
    assert "theta" not in p.uns["ground_truth"] and "theta" in sparse_data.uns["ground_truth"]
    # Poisson counts are less dispersed than NB counts with theta ~ 5
    def mean_var_ratio(a):
        x = a.X.toarray()[_labels(a) == "control"]
        return (x.var(axis=0) / x.mean(axis=0)).mean()
    assert mean_var_ratio(p) < mean_var_ratio(sparse_data)


def test_sparse_shift_roundtrip(sparse_data, tmp_path):
    back = _roundtrip(sparse_data, tmp_path)
    _assert_same_ground_truth(sparse_data.uns["ground_truth"], back.uns["ground_truth"])
    assert (back.X != sparse_data.X).nnz == 0
    np.testing.assert_array_equal(_labels(back, "split"), _labels(sparse_data, "split"))


def test_sparse_shift_defaults_no_zero_genes():
    adata = sim.sparse_shift()
    assert adata.shape == (250 + 100 * 250, 100)
    assert np.all(np.asarray(adata.X.sum(axis=0)).ravel() > 0)
    assert len(adata.uns["ground_truth"]["heldout"]) == 20


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(likelihood="gaussian"),
        dict(min_targets=3, max_targets=2),
        dict(max_targets=6),
        dict(n_heldout=13),
        dict(library_size=0),
        dict(n_latent=0),
        dict(val_fraction=1.0),
    ],
)
def test_sparse_shift_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sim.sparse_shift(**{**SMALL_SPARSE, **kwargs})


# ------------------------------------------------------------------------ combinatorial


def test_combinatorial_contract(comb_data):
    _check_contract(comb_data, n_latent=6)
    gt = comb_data.uns["ground_truth"]
    assert gt["simulator"] == "combinatorial"
    assert comb_data.n_obs == 100 + (8 + 10) * 40
    assert gt["targets"].sum(axis=1).min() >= 1  # every single has a target
    doubles = list(gt["doubles"])
    assert len(doubles) == len(set(doubles)) == 10
    labels = set(_labels(comb_data))
    assert set(doubles) <= labels and set(gt["perturbations"]) <= labels
    assert comb_data.obsm["z_basal_true"].shape == (comb_data.n_obs, 6)


def test_combinatorial_double_shift_is_sum(comb_data):
    gt = comb_data.uns["ground_truth"]
    index = {name: i for i, name in enumerate(gt["perturbations"])}
    labels = _labels(comb_data)
    z = comb_data.obsm["z_true"]
    delta = z - comb_data.obsm["z_basal_true"]
    for row, double in enumerate(gt["doubles"]):
        a, b = double.split("+")
        expected = gt["shifts"][index[a]] + gt["shifts"][index[b]]
        np.testing.assert_allclose(gt["double_shifts"][row], expected, atol=1e-6)
        # the cells' latent offsets are exactly that sum, their mean close to it
        np.testing.assert_allclose(delta[labels == double], np.tile(expected, (40, 1)), atol=1e-5)
        np.testing.assert_allclose(z[labels == double].mean(axis=0), expected, atol=0.6)
    np.testing.assert_allclose(delta[labels == "control"], 0.0, atol=1e-6)


def test_combinatorial_ate(comb_data):
    gt = comb_data.uns["ground_truth"]
    ate = gt["ate"]
    assert ate.dtype == np.float32 and ate.shape == (8 + 10, 50)
    assert gt["ate_observed_depth"].dtype == np.float32 and gt["ate_observed_depth"].shape == ate.shape
    assert list(gt["ate_labels"]) == list(gt["perturbations"]) + list(gt["doubles"])
    assert np.all(np.abs(ate[8:]).max(axis=1) > 0.1)  # doubles have real effects
    # the true ATE agrees with the data ATE of the simulated cells (library ~3000, not 1e4)
    lognorm = _lognorm(comb_data)
    labels = _labels(comb_data)
    control = lognorm[labels == "control"].mean(axis=0)
    data_ate = np.stack([lognorm[labels == l].mean(axis=0) - control for l in gt["ate_labels"]])
    assert np.corrcoef(data_ate.ravel(), ate.ravel())[0, 1] > 0.7


def test_true_ate_of_zero_shift_is_small(comb_data):
    gt = comb_data.uns["ground_truth"]
    ate = sim.true_ate(gt["decoder"], np.zeros((2, 6)), gt["theta"], n_draws=400, seed=1)
    assert ate.shape == (2, 50)
    assert np.abs(ate).mean() < 0.05


def test_combinatorial_random_split(comb_data):
    split = _labels(comb_data, "split")
    n = comb_data.n_obs
    assert (split == "train").sum() == round(0.64 * n)
    assert (split == "test").sum() == round(0.20 * n)


def test_combinatorial_with_fraction():
    kwargs = {**SMALL_COMB, "n_ate_draws": 50}
    half = sim.combinatorial(**kwargs, frac_combinations_train=0.5, seed=0)
    zero = sim.combinatorial(**kwargs, frac_combinations_train=0.0, seed=0)
    info = half.uns["split_info"]
    assert list(info["test_combinations"]) == list(zero.uns["split_info"]["test_combinations"])
    assert len(info["test_combinations"]) == 5
    labels = _labels(half)
    split = _labels(half, "split")
    assert all("+" in l for l in labels[split == "test"])
    assert set(labels[split != "test"]) & set(info["test_combinations"]) == set()
    assert len(info["train_combinations"]) == 3  # round half up of 0.5 * 5
    assert not any("+" in l for l in _labels(zero)[_labels(zero, "split") != "test"])
    # ground truth is kept whole: the ATE covers every label
    assert half.uns["ground_truth"]["ate"].shape == (18, 50)


def test_combinatorial_deterministic_and_roundtrip(comb_data, tmp_path):
    again = sim.combinatorial(**SMALL_COMB, seed=0)
    assert (again.X != comb_data.X).nnz == 0 and again.obs.equals(comb_data.obs)
    np.testing.assert_array_equal(again.uns["ground_truth"]["ate"], comb_data.uns["ground_truth"]["ate"])
    other = sim.combinatorial(**SMALL_COMB, seed=1)
    assert (other.X != comb_data.X).nnz > 0
    back = _roundtrip(comb_data, tmp_path)
    _assert_same_ground_truth(comb_data.uns["ground_truth"], back.uns["ground_truth"])


def test_combinatorial_defaults_no_zero_genes():
    adata = sim.combinatorial(n_ate_draws=100)
    assert adata.shape == (500 + 50 * 100, 200)
    assert np.all(np.asarray(adata.X.sum(axis=0)).ravel() > 0)
    assert adata.uns["ground_truth"]["ate"].shape == (50, 200)


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_doubles=29), dict(mask_prob=1.5), dict(likelihood="zinb"), dict(frac_combinations_train=2.0)],
)
def test_combinatorial_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sim.combinatorial(**{**SMALL_COMB, "n_ate_draws": 10, **kwargs})


def test_combinatorial_depth_presets_and_overrides():
    small = {**SMALL_COMB, "n_ate_draws": 20}
    shallow = sim.combinatorial(**small, depth="shallow", seed=0)
    params = shallow.uns["ground_truth"]["params"]
    assert params["depth"] == "shallow"
    for key, value in sim.DEPTH_PRESETS["shallow"].items():
        assert params[key] == value
    libraries = np.asarray(shallow.X.sum(axis=1)).ravel()
    assert 120 < np.median(libraries) < 180  # LogNormal around 150, minus NB noise
    assert 0.45 < np.std(np.log(libraries)) < 0.8
    # explicit arguments win over the preset; "standard" is the default
    override = sim.combinatorial(**small, depth="shallow", library_size=600, seed=0)
    assert override.uns["ground_truth"]["params"]["library_size"] == 600
    assert override.uns["ground_truth"]["params"]["shift_sd"] == 0.5
    standard = sim.combinatorial(**small, depth="standard", seed=0)
    default = sim.combinatorial(**small, seed=0)
    assert (standard.X != default.X).nnz == 0
    np.testing.assert_array_equal(
        standard.uns["ground_truth"]["ate_observed_depth"], default.uns["ground_truth"]["ate_observed_depth"]
    )
    for bad in ("deep", 3, ["shallow"]):
        with pytest.raises(ValueError, match="depth"):
            sim.combinatorial(**small, depth=bad)


def test_combinatorial_observed_depth_ate_matches_shallow_data():
    """At ~150 UMIs per cell the data ATE (normalise to 1e4, log2(1 + x), mean minus
    control's) estimates the depth-matched truth, not the truth at library 1e4."""
    adata = sim.combinatorial(
        depth="shallow", shift_sd=1.5,  # shallow libraries, effects large enough to compare
        n_latent=4, n_singles=3, n_doubles=0, cells_per_perturbation=4000, n_control_cells=4000,
        n_genes=40, hidden=16, n_ate_draws=4000, seed=0,
    )
    gt = adata.uns["ground_truth"]
    deep, matched = gt["ate"].astype(np.float64), gt["ate_observed_depth"].astype(np.float64)
    assert matched.shape == deep.shape == (3, 40)
    lognorm = _lognorm(adata)
    labels = _labels(adata)
    control = lognorm[labels == "control"].mean(axis=0)
    data_ate = np.stack([lognorm[labels == l].mean(axis=0) - control for l in gt["ate_labels"]])

    def slope(truth):  # least squares of the data ATE on a truth, through the origin
        return float(np.sum(data_ate * truth) / np.sum(truth * truth))

    def rmse(truth):
        return float(np.sqrt(np.mean((data_ate - truth) ** 2)))

    # the depth-matched truth is the data's scale; at 1e4 the effects are ~1.4x smaller
    assert 0.9 < slope(matched) < 1.1
    assert slope(deep) > 1.25
    assert rmse(matched) < 0.7 * rmse(deep)
    # and the residual is sampling noise: about sd(log-normalised cell) * sqrt(2 / 4000)
    noise = lognorm[labels == "control"].std(axis=0).mean() * np.sqrt(2 / 4000)
    assert rmse(matched) < 1.5 * noise


def test_combinatorial_shallow_from_cli(tmp_path):
    from pyro_perturb.cli import main

    out = tmp_path / "shallow.h5ad"
    sets = ["--set", "depth=shallow", "--set", "n_singles=3", "--set", "n_doubles=1",
            "--set", "cells_per_perturbation=20", "--set", "n_control_cells=40", "--set", "n_genes=30",
            "--set", "n_ate_draws=20"]
    assert main(["simulate", "combinatorial", "--out", str(out), *sets]) == 0
    gt = ad.read_h5ad(out).uns["ground_truth"]
    assert gt["params"]["depth"] == "shallow" and gt["params"]["library_size"] == 150
    assert gt["ate_observed_depth"].shape == gt["ate"].shape == (4, 30)


# ------------------------------------------------------------------------ factorized


def test_factorized_contract(fact_data):
    _check_contract(fact_data, n_latent=7)
    gt = fact_data.uns["ground_truth"]
    assert gt["simulator"] == "factorized"
    assert gt["covariate_key"] == "cell_line"
    assert gt["perturbations"] == ["drug_0", "drug_1", "drug_2", "drug_3"]
    groups = fact_data.obs.groupby(["cell_line", "perturbation"], observed=True).size()
    assert len(groups) == 3 * 5 and np.all(groups.to_numpy() == 40)
    # targets / shifts: treatment block means in the z_t columns only
    start, stop = gt["blocks"]["z_t"]
    np.testing.assert_array_equal(gt["shifts"][:, start:stop], gt["treatment_means"])
    assert np.all(gt["shifts"][:, :start] == 0) and np.all(gt["shifts"][:, stop:] == 0)


def test_factorized_blocks(fact_data):
    gt = fact_data.uns["ground_truth"]
    blocks = gt["blocks"]
    assert [list(blocks[k]) for k in ("z_x", "z_t", "z_tx")] == [[0, 2], [2, 5], [5, 7]]
    z = fact_data.obsm["z_true"]
    for key in ("z_x", "z_t", "z_tx"):
        start, stop = blocks[key]
        np.testing.assert_array_equal(z[:, start:stop], fact_data.obsm[f"{key}_true"])
    lines = _labels(fact_data, "cell_line")
    perts = _labels(fact_data)
    control = perts == "control"
    # z_x follows the covariate, z_t the treatment, z_tx the pair; controls have 0 mean
    for c, line in enumerate(gt["covariates"]):
        np.testing.assert_allclose(
            fact_data.obsm["z_x_true"][lines == line].mean(axis=0), gt["covariate_means"][c], atol=0.4
        )
    np.testing.assert_allclose(fact_data.obsm["z_t_true"][control].mean(axis=0), 0.0, atol=0.4)
    np.testing.assert_allclose(fact_data.obsm["z_tx_true"][control].mean(axis=0), 0.0, atol=0.4)
    for t, drug in enumerate(gt["perturbations"]):
        np.testing.assert_allclose(
            fact_data.obsm["z_t_true"][perts == drug].mean(axis=0), gt["treatment_means"][t], atol=0.4
        )
        for c, line in enumerate(gt["covariates"]):
            cells = (perts == drug) & (lines == line)
            np.testing.assert_allclose(
                fact_data.obsm["z_tx_true"][cells].mean(axis=0), gt["interaction_means"][c, t], atol=0.7
            )


def test_factorized_interaction_is_not_additive(fact_data):
    g = fact_data.uns["ground_truth"]["interaction_means"].astype(np.float64)  # (C, T, L)
    additive = g.mean(axis=1, keepdims=True) + g.mean(axis=0, keepdims=True) - g.mean(axis=(0, 1))
    residual = ((g - additive) ** 2).sum() / ((g - g.mean(axis=(0, 1))) ** 2).sum()
    assert residual > 0.15
    scaled = sim.factorized(**SMALL_FACT, interaction_scale=0.5, seed=0)
    np.testing.assert_allclose(scaled.uns["ground_truth"]["interaction_means"], 0.5 * g, rtol=1e-5)


def test_factorized_heldout_pairs(fact_data):
    gt = fact_data.uns["ground_truth"]
    pairs = list(gt["heldout_pairs"])
    assert len(pairs) == 3 and len(set(pairs)) == 3
    lines = _labels(fact_data, "cell_line")
    perts = _labels(fact_data)
    split = _labels(fact_data, "split")
    group = np.char.add(np.char.add(lines.astype(str), "|"), perts.astype(str))
    heldout = np.isin(group, pairs)
    np.testing.assert_array_equal(fact_data.obs["heldout"].to_numpy(), heldout)
    assert np.all(split[heldout] == "test") and not np.any(split[~heldout] == "test")
    train = split == "train"
    for pair in pairs:
        line, drug = pair.split("|")
        assert drug != "control"
        # the held-out covariate is seen treated, and the held-out drug seen, in training
        assert np.any(train & (lines == line) & (perts != "control"))
        assert np.any(train & (perts == drug))
    assert abs((split == "val").sum() / (~heldout).sum() - 0.2) < 0.02


def test_factorized_deterministic_roundtrip_and_defaults(fact_data, tmp_path):
    again = sim.factorized(**SMALL_FACT, seed=0)
    assert (again.X != fact_data.X).nnz == 0 and again.obs.equals(fact_data.obs)
    other = sim.factorized(**SMALL_FACT, seed=1)
    assert (other.X != fact_data.X).nnz > 0
    back = _roundtrip(fact_data, tmp_path)
    _assert_same_ground_truth(fact_data.uns["ground_truth"], back.uns["ground_truth"])
    default = sim.factorized()
    assert default.shape == (4 * 7 * 100, 200)
    assert np.all(np.asarray(default.X.sum(axis=0)).ravel() > 0)
    assert default.obsm["z_true"].shape == (2800, 12)
    assert [list(v) for v in default.uns["ground_truth"]["blocks"].values()] == [[0, 4], [4, 8], [8, 12]]


@pytest.mark.parametrize("kwargs", [dict(n_heldout_pairs=10), dict(n_covariates=0), dict(likelihood="x")])
def test_factorized_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sim.factorized(**{**SMALL_FACT, **kwargs})
