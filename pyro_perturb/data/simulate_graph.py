"""Shared parts of the gene-graph simulators (DAGs for DCD-FG, cyclic graphs for
NODAGS-Flow): from structural-equation values to the zoo's AnnData of counts.

Conventions every graph simulator follows (the graph evaluator and the tests read them):

* ``X``: counts ``(n_cells, G)``, drawn so that the zoo's normalisation
  ``log1p(1e4 x / l)`` recovers the SEM values up to counting noise (see
  :func:`counts_from_sem`);
* ``obs["perturbation"]``: the targeted gene's name (``var_names``), ``"A+B"`` for a
  double, ``"control"`` for unperturbed cells;
* ``varp["true_adjacency"]``: ``(G, G)`` float, entry ``[i, j]`` the weight of the true
  edge gene i -> gene j (0: no edge);
* ``layers["sem"]``: the SEM values themselves (float32), before counting noise;
* ``uns["ground_truth"]``: a dict with at least ``"simulator"`` and the generating
  settings; ``uns["simulator"]`` repeats the name.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

#: key of the true graph in ``adata.varp``
TRUE_ADJACENCY = "true_adjacency"


def counts_from_sem(
    values: np.ndarray,
    rng: np.random.Generator,
    library_size: float = 2e4,
    library_log_sd: float = 0.1,
    baseline_scale: float = 0.5,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Poisson counts whose log proportions follow the SEM values.

    Gene g of cell i gets ``x_ig ~ Poisson(l_i * softmax_g(values_ig + b_g))`` with a
    per-gene baseline ``b_g ~ N(0, baseline_scale^2)`` and ``log l_i ~ N(log
    library_size, library_log_sd^2)``. With a deep library (the default, about 2e4 / G
    counts per gene), ``log1p(1e4 x / l)`` is an affine, nearly noiseless function of the
    values for every gene, so a graph fitted on normalised counts sees the SEM's edges.

    Args:
        values: ``(n_cells, G)`` SEM values.

    Returns:
        counts ``(n_cells, G)`` CSR float32 holding integers, and the libraries ``(n_cells,)``.
    """
    values = np.asarray(values, dtype=np.float64)
    n_cells, n_genes = values.shape
    baseline = baseline_scale * rng.standard_normal(n_genes)
    logits = values + baseline
    logits -= logits.max(axis=1, keepdims=True)
    proportions = np.exp(logits)
    proportions /= proportions.sum(axis=1, keepdims=True)
    library = np.exp(np.log(library_size) + library_log_sd * rng.standard_normal(n_cells))
    counts = rng.poisson(proportions * library[:, None]).astype(np.float32)
    return sp.csr_matrix(counts), library


def graph_anndata(
    counts: sp.csr_matrix,
    labels: np.ndarray,
    genes: list[str],
    adjacency: np.ndarray,
    sem_values: np.ndarray,
    ground_truth: dict[str, Any],
) -> ad.AnnData:
    """The AnnData of the graph simulators' conventions (module docstring)."""
    n_cells, n_genes = counts.shape
    if adjacency.shape != (n_genes, n_genes):
        raise ValueError(f"adjacency has shape {adjacency.shape}, expected ({n_genes}, {n_genes})")
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(np.asarray(labels, dtype=object))},
        index=pd.Index([f"cell_{i:06d}" for i in range(n_cells)]),
    )
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes))))
    adata.varp[TRUE_ADJACENCY] = np.asarray(adjacency, dtype=np.float32)
    adata.layers["sem"] = np.asarray(sem_values, dtype=np.float32)
    adata.uns["ground_truth"] = dict(ground_truth)
    adata.uns["simulator"] = ground_truth["simulator"]
    return adata


__all__ = ["TRUE_ADJACENCY", "counts_from_sem", "graph_anndata"]
