"""Property-based tests of the data layer: random AnnData objects either load correctly or
raise the documented ``ValueError``; never another exception."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_perturb.data import PerturbationData
from pyro_perturb.data.anndata import MIN_CELLS_RANDOM_SPLIT

LABEL_PARTS = st.sampled_from(["A", "B", "gene-1", "ünï", " C ", "x y", "", "control"])
LABELS = st.one_of(
    st.just("control"),
    LABEL_PARTS,
    st.tuples(LABEL_PARTS, LABEL_PARTS).map(lambda t: "+".join(t)),
    st.none(),
)


CLEAN_PARTS = st.sampled_from(["A", "B", "gene-1", "ünï", "x y"])
CLEAN_LABELS = st.one_of(
    st.just("control"),
    CLEAN_PARTS,
    st.tuples(CLEAN_PARTS, CLEAN_PARTS).filter(lambda t: t[0] != t[1]).map(lambda t: "+".join(t)),
)


@st.composite
def adatas(draw, clean: bool = False):
    """Random AnnData objects; ``clean=True`` draws only valid ones (they must load)."""
    # valid data has enough cells for the random split (no split column when clean)
    n_cells = draw(st.integers(MIN_CELLS_RANDOM_SPLIT if clean else 1, 12))
    n_genes = draw(st.integers(1, 5))
    # each kind of dirt is switched on as a whole, so that clean-ish examples stay common
    bad_values = not clean and draw(st.booleans())
    value = st.integers(0, 20).map(float)
    if bad_values:
        value = st.one_of(value, st.sampled_from([0.5, -1.0, np.nan, np.inf]))
    X = np.asarray(draw(st.lists(value, min_size=n_cells * n_genes, max_size=n_cells * n_genes)), dtype=np.float32)
    X = X.reshape(n_cells, n_genes)
    if clean:
        X[:, 0] += 1.0  # every cell has counts
        X[0, :] += 1.0  # and every gene
    labels = draw(st.lists(CLEAN_LABELS if clean or draw(st.booleans()) else LABELS, min_size=n_cells, max_size=n_cells))
    if clean:
        labels[0] = "control"
    index = [f"c{i}" for i in range(n_cells)]
    # the Series must carry the frame's index: without it pandas aligns on 0..n-1 and every label is NaN
    obs = pd.DataFrame({"perturbation": pd.Series(labels, dtype=object, index=index)}, index=index)
    if draw(st.booleans()):
        obs["perturbation"] = obs["perturbation"].astype("category")
        if draw(st.booleans()):  # an empty category
            obs["perturbation"] = obs["perturbation"].cat.add_categories(["never_used"])
    if draw(st.booleans()):
        numeric = st.sampled_from([1.0, 2.5] if clean else [0.0, 1.0, 2.5, -1.0, np.nan])
        per_component = st.sampled_from(["1.0+0.5", "2", "0.5+0.5+1", "abc", "", "1.0+-2"])
        dirty_doses = not clean and draw(st.booleans())
        obs["dose"] = draw(st.lists(st.one_of(numeric, per_component) if dirty_doses else numeric,
                                    min_size=n_cells, max_size=n_cells))
    if draw(st.booleans()):  # a covariate: strings, missing values, an empty category
        values = ["A172", "K562", "ünï"] if clean or draw(st.booleans()) else ["A172", "K562", "", None, "ünï"]
        cov = draw(st.lists(st.sampled_from(values), min_size=n_cells, max_size=n_cells))
        obs["cell_line"] = pd.Series(cov, dtype=object, index=obs.index)
        if draw(st.booleans()):
            obs["cell_line"] = obs["cell_line"].astype("category").cat.add_categories(["unused_line"])
    if not clean and draw(st.booleans()):
        obs["split"] = draw(st.lists(st.sampled_from(["train", "val", "test", "other"]), min_size=n_cells, max_size=n_cells))
    adata = ad.AnnData(X=sp.csr_matrix(X) if draw(st.booleans()) else X, obs=obs)
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    return adata


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(adata=adatas(), use_dose=st.booleans(), use_covariate=st.booleans())
def test_random_anndata_loads_or_raises_value_error(adata, use_dose, use_covariate):
    dose_key = "dose" if use_dose and "dose" in adata.obs else None
    covariate_keys = ["cell_line"] if use_covariate and "cell_line" in adata.obs else []
    try:
        data = PerturbationData.from_anndata(adata, dose_key=dose_key, covariate_keys=covariate_keys)
    except ValueError as e:
        assert str(e)  # a message that names the problem
        return
    # loaded: the encoding is consistent with the input
    assert data.n_cells == adata.n_obs
    assert data.dosage.shape == (adata.n_obs, data.spec.n_perturbations)
    assert data.spec.labels[0] == "control"
    assert np.isfinite(data.library).all() and (data.library > 0).all()
    dense = np.asarray(data.dosage.todense())
    control = data.labels == 0
    assert (dense[control] == 0).all()
    assert set(np.unique(data.split)) <= {"train", "val", "test"}
    if covariate_keys:
        assert data.covariates.shape == (adata.n_obs, 1) and (data.covariates >= 0).all()
    if data.n_cells:
        batch = data.batch(np.arange(data.n_cells))
        assert batch.x.shape == adata.shape


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(adata=adatas(clean=True), use_dose=st.booleans(), use_covariate=st.booleans())
def test_valid_random_anndata_always_loads(adata, use_dose, use_covariate):
    """The other side of the property: valid input is never refused."""
    dose_key = "dose" if use_dose and "dose" in adata.obs else None
    covariate_keys = ["cell_line"] if use_covariate and "cell_line" in adata.obs else []
    data = PerturbationData.from_anndata(adata, dose_key=dose_key, covariate_keys=covariate_keys)
    assert data.n_cells == adata.n_obs
    labels = {lab for lab in adata.obs["perturbation"].astype(str)}
    singles = {part for lab in labels if lab != "control" for part in lab.split("+")}
    assert set(data.spec.perturbations) == singles
    assert np.asarray(data.dosage.sum(1)).ravel()[0] == 0  # the control cell
