"""The data layer: encoding, splits, minibatches, and every bad-input case."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_perturb.data import Batch, PerturbationData, canonical_label
from pyro_perturb.data.anndata import MAX_COUNT, MIN_CELLS_RANDOM_SPLIT
from pyro_perturb.registry import list_models
from pyro_perturb.run import fit

from .conftest import shared_data


def make_adata(n_per=20, n_genes=12, labels=("control", "A", "B", "A+B"), sparse=True, seed=0, **obs):
    rng = np.random.default_rng(seed)
    pert = np.repeat(labels, n_per)
    X = rng.poisson(3.0, size=(len(pert), n_genes)).astype(np.float32)
    X[:, 0] += 1  # no empty cells or genes
    frame = pd.DataFrame({"perturbation": pert, **obs}, index=[f"c{i}" for i in range(len(pert))])
    adata = ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=frame)
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    return adata


def test_encoding_multi_hot_and_labels():
    adata = make_adata(labels=("control", "A", "B", "B+A"))
    data = PerturbationData.from_anndata(adata)
    spec = data.spec
    assert spec.perturbations == ["A", "B"]
    assert spec.labels == ["control", "A", "A+B", "B"]  # "B+A" canonicalised
    d = np.asarray(data.dosage.todense())
    assert d.shape == (80, 2)
    np.testing.assert_array_equal(d[:20], 0)
    np.testing.assert_array_equal(d[20:40], [[1, 0]] * 20)
    np.testing.assert_array_equal(d[60:], [[1, 1]] * 20)
    assert (data.labels[:20] == 0).all() and (data.labels[60:] == spec.labels.index("A+B")).all()
    np.testing.assert_allclose(data.library, np.asarray(adata.X.sum(1)).ravel())
    assert spec.dosage_of("B+A").tolist() == [1.0, 1.0]


def test_dense_and_sparse_agree():
    dense = PerturbationData.from_anndata(make_adata(sparse=False))
    sparse = PerturbationData.from_anndata(make_adata(sparse=True))
    idx = np.array([5, 3, 70])
    np.testing.assert_array_equal(dense.read_counts(idx), sparse.read_counts(idx))
    np.testing.assert_array_equal(dense.split, sparse.split)


def test_backed_streams_batches(tmp_path):
    adata = make_adata(n_per=50)
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    data = PerturbationData.from_anndata(backed)
    mem = PerturbationData.from_anndata(adata)
    idx = np.array([150, 2, 77])
    np.testing.assert_array_equal(data.read_counts(idx), mem.read_counts(idx))
    total = sum(b.size for b in data.batches("train", batch_size=16, shuffle=True))
    assert total == len(data.indices("train"))


@pytest.mark.parametrize("kind", ["dense", "csr", "backed"])
def test_batch_rows_follow_the_requested_order(kind, tmp_path):
    """``batch`` and ``read_counts`` return row i for cell idx[i], whatever the order."""
    adata = make_adata(n_per=30, sparse=kind != "dense", line=np.tile(["x", "y", "z"], 40),
                       dose=np.linspace(0.5, 2.0, 120))
    X = np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X)
    source = adata
    if kind == "backed":
        adata.write_h5ad(tmp_path / "d.h5ad")
        source = ad.read_h5ad(tmp_path / "d.h5ad", backed="r")
    data = PerturbationData.from_anndata(source, covariate_keys=["line"], dose_key="dose")
    rng = np.random.default_rng(0)
    idx = rng.permutation(data.n_cells)[:50]
    assert (np.diff(idx) < 0).any()  # really shuffled
    positions = rng.permutation(1000)[:50]
    batch = data.batch(idx, n_cells=1000, positions=positions)
    np.testing.assert_array_equal(batch.x.numpy(), X[idx])
    np.testing.assert_array_equal(batch.d.numpy(), data.dosage.toarray()[idx])
    np.testing.assert_array_equal(batch.c.numpy(), data.covariates[idx])
    np.testing.assert_array_equal(batch.label.numpy(), data.labels[idx])
    np.testing.assert_allclose(batch.library.numpy(), X[idx].sum(1))
    np.testing.assert_array_equal(batch.index.numpy(), positions)
    assert batch.n_cells == 1000
    np.testing.assert_array_equal(data.read_counts(idx), X[idx])
    np.testing.assert_array_equal(data.batch(idx[::-1]).x.numpy(), X[idx[::-1]])
    np.testing.assert_array_equal(data.batch(idx).index.numpy(), np.arange(50))  # default positions


def test_doses_numeric_and_per_component():
    adata = make_adata(labels=("control", "A", "A+B"))
    adata.obs["dose"] = np.r_[np.zeros(20), np.full(20, 0.5), np.full(20, 2.0)]
    data = PerturbationData.from_anndata(adata, dose_key="dose")
    d = np.asarray(data.dosage.todense())
    np.testing.assert_allclose(d[20], [0.5, 0])
    np.testing.assert_allclose(d[40], [2.0, 2.0])
    adata.obs["dose"] = ["0"] * 20 + ["0.5"] * 20 + ["1.0+0.25"] * 20
    d = np.asarray(PerturbationData.from_anndata(adata, dose_key="dose").dosage.todense())
    np.testing.assert_allclose(d[40], [1.0, 0.25])


def test_covariates_and_split_column():
    adata = make_adata(line=np.tile(["x", "y"], 40), split=np.repeat(["train", "val", "test", "train"], 20))
    # the column as given (all controls in training; hold_out_controls is tested in test_splits.py)
    data = PerturbationData.from_anndata(adata, covariate_keys=["line"], heldout_control_fraction=0)
    assert data.spec.covariate_categories == [["x", "y"]]
    assert data.covariates[:4, 0].tolist() == [0, 1, 0, 1]
    assert len(data.indices("train")) == 40 and len(data.indices("test")) == 20


def test_random_split_seeded():
    a = PerturbationData.from_anndata(make_adata(), seed=1)
    b = PerturbationData.from_anndata(make_adata(), seed=1)
    c = PerturbationData.from_anndata(make_adata(), seed=2)
    np.testing.assert_array_equal(a.split, b.split)
    assert (a.split != c.split).any()
    counts = {s: int((a.split == s).sum()) for s in ("train", "val", "test")}
    assert counts["train"] > counts["test"] > 0 and counts["val"] > 0


def test_batches_cover_split_once_and_shapes():
    data = PerturbationData.from_anndata(make_adata(line=np.tile(["x", "y"], 40)), covariate_keys=["line"])
    seen = []
    for batch in data.batches("train", batch_size=7, shuffle=False):
        assert isinstance(batch, Batch)
        assert batch.x.shape == (batch.size, 12) and batch.d.shape == (batch.size, 2)
        assert batch.c.shape == (batch.size, 1) and batch.c.dtype == torch.long
        assert batch.n_cells == len(data.indices("train"))
        seen.extend(batch.index.tolist())
    assert sorted(seen) == list(range(len(data.indices("train"))))
    orders = [
        [int(i) for b in data.batches("train", 7, shuffle=True, seed=s) for i in b.index] for s in (0, 0, 1)
    ]
    assert orders[0] == orders[1] != orders[2]


def test_gene_stats():
    data = PerturbationData.from_anndata(make_adata())
    mean, std = data.gene_stats("train")
    x = np.log1p(data.read_counts(data.indices("train")))
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-4)


def test_canonical_label():
    assert canonical_label("B+A", "control", "+") == "A+B"
    assert canonical_label("control", "control", "+") == "control"


# ---------------------------------------------------------------------------- bad input
def _bad(adata, match, **kw):
    with pytest.raises(ValueError, match=match):
        PerturbationData.from_anndata(adata, **kw)


def test_missing_perturbation_column():
    _bad(make_adata(), "perturbation column 'guide' not found", perturbation_key="guide")


def test_control_absent():
    _bad(make_adata(), "control label 'non-targeting' not found", control="non-targeting")


def test_negative_counts():
    adata = make_adata(sparse=False)
    adata.X[3, 2] = -1
    _bad(adata, "negative")


def test_non_integer_counts():
    adata = make_adata()
    adata.X = adata.X * 0.5
    _bad(adata, "integers")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_inf_counts(value):
    adata = make_adata(sparse=False)
    adata.X[0, 0] = value
    _bad(adata, "NaN or infinite")


def test_missing_and_empty_labels():
    adata = make_adata()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(object)
    adata.obs.iloc[3, 0] = None
    _bad(adata, "missing values")
    adata = make_adata()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(object)
    adata.obs.iloc[3, 0] = "  "
    _bad(adata, "empty labels")
    adata = make_adata(labels=("control", "A+"))
    _bad(adata, "empty component")


def test_zero_genes_and_empty_cells():
    adata = make_adata(sparse=False)
    adata.X[:, 5] = 0
    _bad(adata, "zero counts in every cell: 'g5'")
    adata = make_adata(sparse=False)
    adata.X[7, :] = 0
    _bad(adata, "zero total counts")


def test_bad_split_values_and_covariates():
    _bad(make_adata(split=["training"] * 80), "may only hold")
    _bad(make_adata(), "covariate column 'line' not found", covariate_keys=["line"])
    adata = make_adata(line=[None] + ["x"] * 79)
    _bad(adata, "covariate column 'line' has 1 missing", covariate_keys=["line"])


def test_bad_layer_and_dose():
    _bad(make_adata(), "layer 'counts' not found", layer="counts")
    adata = make_adata(labels=("control", "A+B"))
    adata.obs["dose"] = ["1"] * 20 + ["1+2+3"] * 20
    _bad(adata, "3 components", dose_key="dose")
    adata.obs["dose"] = ["1"] * 20 + ["high"] * 20
    _bad(adata, "non-numeric", dose_key="dose")


def test_empty_adata_and_wrong_type():
    _bad(make_adata()[:0], "no cells")
    with pytest.raises(ValueError, match="AnnData"):
        PerturbationData.from_anndata(np.zeros((3, 3)))


def test_duplicate_gene_names():
    adata = make_adata()
    adata.var_names = ["g0", "g1", "g2", "g1", "g0"] + [f"h{i}" for i in range(7)]
    _bad(adata, r"gene names \(adata.var_names\) are not unique: 'g0', 'g1'")
    spec = PerturbationData.from_anndata(make_adata()).spec
    _bad(adata, "not unique", spec=spec)  # named before the comparison with the model's genes


@pytest.mark.parametrize("sparse", [False, True])
def test_counts_beyond_float32_exact_integers(sparse):
    def with_count(value):
        adata = make_adata(sparse=False)
        X = adata.X.astype(np.float64)
        X[4, 1] = value
        adata.X = sp.csr_matrix(X) if sparse else X
        return adata

    _bad(with_count(1e30), "counts above 16,777,216 .*float32.*found 1e\\+30")
    _bad(with_count(MAX_COUNT + 1), "counts above 16,777,216")
    data = PerturbationData.from_anndata(with_count(MAX_COUNT))  # the bound itself is fine
    assert data.read_counts(np.array([4]))[0, 1] == MAX_COUNT


def test_too_few_cells_for_a_random_split():
    three = make_adata(n_per=1, labels=("control", "A", "B"))
    _bad(three, f"3 cells are too few to split.*at least {MIN_CELLS_RANDOM_SPLIT} cells")
    four = PerturbationData.from_anndata(make_adata(n_per=1, labels=("control", "A", "B", "A+B")))
    assert all(len(four.indices(s)) == 1 for s in ("val", "test"))
    # encoding for a trained model (prediction) needs no split
    assert PerturbationData.from_anndata(three, spec=four.spec).n_cells == 3


@pytest.mark.parametrize("missing,consequence", [("val", "early stopping .* training loss"), ("test", "evaluation will report no test metrics")])
def test_split_column_without_val_or_test_warns(missing, consequence):
    parts = [p for p in ("train", "val", "test") if p != missing]
    adata = make_adata(split=np.repeat(parts + ["train", "train"], 20))
    with pytest.warns(UserWarning, match=f"obs\\['split'\\] has no '{missing}' cells: {consequence}"):
        data = PerturbationData.from_anndata(adata)
    assert len(data.indices(missing)) == 0
    with warnings.catch_warnings():  # evaluation data of a trained model: nothing to say
        warnings.simplefilter("error")
        PerturbationData.from_anndata(adata, spec=data.spec)


def test_empty_val_split_trains_on_the_training_loss():
    adata = make_adata(split=np.repeat(["train", "test", "train", "train"], 20))
    with pytest.warns(UserWarning, match="no 'val' cells"):
        run = fit(adata, model="cvae", max_epochs=2, progress=False, n_hidden=8)
    assert [row["val_loss"] for row in run.history] == [row["train_loss"] for row in run.history]


def test_control_only_data_only_for_label_free_models():
    adata = make_adata(labels=("control",), n_per=60)
    data = PerturbationData.from_anndata(adata)
    assert data.spec.n_perturbations == 0 and data.spec.labels == ["control"]
    label_free = sorted(e.name for e in list_models() if not e.needs_perturbations)
    # models registered later (scvi...) may join the label-free ones
    assert {"beta_vae", "vae"} <= set(label_free)
    for entry in list_models():
        if entry.needs_perturbations:
            with pytest.raises(ValueError, match=f"model '{entry.name}' needs perturbed cells.*only the control "
                                                 f"label 'control'.*{', '.join(label_free)}"):
                fit(adata, model=entry.name, max_epochs=1, progress=False)
    run = fit(data, model="vae", max_epochs=1, progress=False, n_hidden=8)
    assert np.isfinite(run.history[-1]["train_loss"])


def test_prediction_with_spec_refuses_unknowns():
    spec = PerturbationData.from_anndata(make_adata()).spec
    _bad(make_adata(labels=("control", "C")), "never learned: 'C'", spec=spec)
    other = make_adata()
    other.var_names = [f"h{i}" for i in range(12)]
    _bad(other, "lacks 12 genes", spec=spec)
    cov_spec = PerturbationData.from_anndata(make_adata(line=["x"] * 80), covariate_keys=["line"]).spec
    _bad(make_adata(line=["z"] * 80), "never saw: 'z'", spec=cov_spec)


def test_prediction_with_spec_accepts_unseen_combination():
    spec = PerturbationData.from_anndata(make_adata(labels=("control", "A", "B"))).spec
    data = PerturbationData.from_anndata(make_adata(labels=("control", "A+B")), spec=spec)
    assert (data.labels[20:] == -1).all()  # no label code, but a valid dosage
    np.testing.assert_array_equal(np.asarray(data.dosage[25].todense()), [[1, 1]])
    # genes with zero counts are fine at prediction time
    adata = make_adata(sparse=False)
    adata.X[:, 5] = 0
    PerturbationData.from_anndata(adata, spec=spec)


@pytest.mark.parametrize("name,key,control,cov", [
    ("papalexi2021_eccite_lowmoi.h5ad", "perturbation", "control", []),
    ("kang2018_ifnb_pbmc.h5ad", "group_id", "ctrl", ["cluster_id"]),
])
def test_real_data_loads(name, key, control, cov):
    adata = ad.read_h5ad(shared_data(name))
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()
    data = PerturbationData.from_anndata(adata, perturbation_key=key, control=control, covariate_keys=cov)
    assert data.n_cells == adata.n_obs
    assert data.spec.labels[0] == control
    batch = next(data.batches("train", 64))
    assert batch.x.shape == (64, adata.n_vars)


def test_request_batch_for_posterior_predictive():
    spec = PerturbationData.from_anndata(make_adata(line=np.tile(["x", "y"], 40)), covariate_keys=["line"]).spec
    batch = spec.request_batch(["control", "A+B", "A"], np.array([1e3, 2e3, 3e3]), covariate_codes=[1])
    assert batch.x is None and batch.size == 3
    assert batch.d.tolist() == [[0, 0], [1, 1], [1, 0]]
    assert batch.label.tolist() == [0, spec.labels.index("A+B"), spec.labels.index("A")]
    assert batch.c.tolist() == [[1], [1], [1]] and batch.library.tolist() == [1e3, 2e3, 3e3]
    default = spec.request_batch(["A"], 1e4)
    assert default.c.tolist() == [[0]] and default.library.tolist() == [1e4]


def test_request_batch_refuses_unknown_perturbation():
    spec = PerturbationData.from_anndata(make_adata()).spec
    with pytest.raises(ValueError, match="'C'"):
        spec.request_batch(["C"], 1e4)


def test_per_component_dose_follows_the_written_order():
    """``"B+A"`` with dose ``"1.0+0.5"``: B (written first) gets 1.0 and A 0.5, although the
    label is canonicalised to ``"A+B"``."""
    labels = ["control"] * 3 + ["B+A"] * 3 + ["A+B"] * 3 + ["A"] * 3
    doses = ["1"] * 3 + ["1.0+0.5"] * 6 + ["2"] * 3
    obs = pd.DataFrame({"perturbation": labels, "dose": doses, "split": ["train"] * 12},
                       index=[f"c{i}" for i in range(12)])
    x = np.random.default_rng(0).integers(1, 9, size=(12, 5)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs)
    adata.var_names = [f"g{i}" for i in range(5)]
    with pytest.warns(UserWarning):
        data = PerturbationData.from_anndata(adata, dose_key="dose", heldout_control_fraction=0)
    assert data.spec.perturbations == ["A", "B"]
    dosage = data.dosage.toarray()
    np.testing.assert_array_equal(dosage[3], [0.5, 1.0])  # B+A: B=1.0, A=0.5
    np.testing.assert_array_equal(dosage[6], [1.0, 0.5])  # A+B: A=1.0, B=0.5
    np.testing.assert_array_equal(dosage[9], [2.0, 0.0])
    assert list(data.label_names([3, 6])) == ["A+B", "A+B"]
