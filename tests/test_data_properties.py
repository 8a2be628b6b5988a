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

LABEL_PARTS = st.sampled_from(["A", "B", "gene-1", "ünï", " C ", "x y", "", "control"])
LABELS = st.one_of(
    st.just("control"),
    LABEL_PARTS,
    st.tuples(LABEL_PARTS, LABEL_PARTS).map(lambda t: "+".join(t)),
    st.none(),
)


@st.composite
def adatas(draw):
    n_cells = draw(st.integers(1, 12))
    n_genes = draw(st.integers(1, 5))
    values = draw(
        st.lists(
            st.one_of(st.integers(0, 20).map(float), st.sampled_from([0.5, -1.0, np.nan, np.inf])),
            min_size=n_cells * n_genes,
            max_size=n_cells * n_genes,
        )
    )
    X = np.asarray(values, dtype=np.float32).reshape(n_cells, n_genes)
    labels = draw(st.lists(LABELS, min_size=n_cells, max_size=n_cells))
    obs = pd.DataFrame({"perturbation": pd.Series(labels, dtype=object)}, index=[f"c{i}" for i in range(n_cells)])
    if draw(st.booleans()):
        obs["perturbation"] = obs["perturbation"].astype("category")
        if draw(st.booleans()):  # an empty category
            obs["perturbation"] = obs["perturbation"].cat.add_categories(["never_used"])
    if draw(st.booleans()):
        obs["dose"] = draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, -1.0, np.nan]), min_size=n_cells, max_size=n_cells))
    if draw(st.booleans()):
        obs["split"] = draw(st.lists(st.sampled_from(["train", "val", "test", "other"]), min_size=n_cells, max_size=n_cells))
    adata = ad.AnnData(X=sp.csr_matrix(X) if draw(st.booleans()) else X, obs=obs)
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    return adata


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(adata=adatas(), use_dose=st.booleans())
def test_random_anndata_loads_or_raises_value_error(adata, use_dose):
    dose_key = "dose" if use_dose and "dose" in adata.obs else None
    try:
        data = PerturbationData.from_anndata(adata, dose_key=dose_key)
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
    if data.n_cells:
        batch = data.batch(np.arange(data.n_cells))
        assert batch.x.shape == adata.shape
