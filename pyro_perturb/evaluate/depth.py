"""Sequencing depth of predicted cells: the training cells' library sizes, summarised.

A run stores, at fit time, the distribution of its training cells' library sizes
(:func:`library_distribution`: quantiles overall, per label and per covariate
combination) in its ``config.json``, so that predictions at the data's own depth
(``Run.ate(..., library="observed")``, ``Run.sample``) need no data.
:func:`library_pools` turns it into the ``{label: library sizes}`` mapping that
:func:`~pyro_perturb.evaluate.predictive.model_effects` takes.
"""

from __future__ import annotations

import numpy as np

from ..data import PerturbationData

__all__ = ["QUANTILES", "POOL_SIZE", "library_distribution", "library_pools"]

#: quantiles stored per group (0%, 1%, ..., 100%)
QUANTILES = 101
#: library sizes in a pool made from quantiles
POOL_SIZE = 1000


def _summary(library: np.ndarray) -> dict:
    q = np.quantile(np.asarray(library, dtype=np.float64), np.linspace(0.0, 1.0, QUANTILES))
    return {"n_cells": int(len(library)), "quantiles": [round(float(v), 2) for v in q]}


def library_distribution(data: PerturbationData) -> dict:
    """Quantiles of the training cells' library sizes (all cells if there are no
    training cells): ``{"all": ..., "labels": {label: ...}, "covariates": {"a|b": ...}}``,
    each ``{"n_cells", "quantiles"}`` with :data:`QUANTILES` quantiles (0% to 100%).
    Labels are canonical; covariate values are joined with ``"|"`` in
    ``spec.covariate_keys`` order. JSON-ready."""
    idx = data.indices("train")
    if len(idx) == 0:
        idx = np.arange(data.n_cells)
    library = np.asarray(data.library[idx], dtype=np.float64)
    labels = data.label_names(idx)
    out: dict = {"all": _summary(library), "labels": {}, "covariates": {}}
    for lab in dict.fromkeys(labels.tolist()):
        out["labels"][lab] = _summary(library[labels == lab])
    if data.spec.covariate_keys:
        codes = data.covariates[idx]
        keys = np.array([
            "|".join(cats[c] for cats, c in zip(data.spec.covariate_categories, row)) for row in codes.tolist()
        ], dtype=object)
        for key in dict.fromkeys(keys.tolist()):
            out["covariates"][key] = _summary(library[keys == key])
    return out


def _pool(summary: dict, size: int) -> np.ndarray:
    """``size`` library sizes evenly spread over the distribution: the piecewise-linear
    quantile function at ``(i + 0.5) / size``."""
    q = np.asarray(summary["quantiles"], dtype=np.float64)
    return np.interp((np.arange(size) + 0.5) / size, np.linspace(0.0, 1.0, len(q)), q)


def library_pools(distribution: dict, labels, covariates: str | None = None, size: int = POOL_SIZE) -> dict[str, np.ndarray]:
    """``{label: library sizes}`` for :func:`~pyro_perturb.evaluate.predictive.model_effects`.

    A label's pool is its training cells' distribution; a label without training cells
    (an unseen combination) gets the cells of the covariate combination ``covariates``
    (values joined with ``"|"``) when given and known, else all training cells.
    """
    if not isinstance(distribution, dict) or "all" not in distribution:
        raise ValueError("the library-size distribution lacks its 'all' entry")
    per_label = distribution.get("labels", {})
    fallback = distribution.get("covariates", {}).get(covariates) if covariates is not None else None
    fallback = fallback or distribution["all"]
    return {lab: _pool(per_label.get(lab) or fallback, size) for lab in dict.fromkeys(labels)}
