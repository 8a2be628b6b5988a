"""ATE statistics of the data: the data ATE, treatment splits and representable labels.

* :func:`data_ate`: normalise each cell to 1e4 counts, ``log2(1 + x)``
  (:func:`~pyro_perturb.normalize.lognormalize`), take the mean over the cells of a label
  minus the mean over control cells.
* :func:`treatment_splits`: a label is "train" if it has training cells, "test" if its
  cells are all in the test split (held-out combinations).
* :func:`representable_labels`: the labels a model can predict, and why not the others.
* :func:`cell_indices`: the cells a selection (``"heldout"``, ``"all"``, a split name or
  indices) names, shared with the posterior predictive check.
* :func:`covariate_strings`: each cell's covariate values joined with ``"|"``.
* :func:`cell_means`: per group of cells, the mean log-normalised and the mean normalised
  expression (the two effect statistics' building blocks), in one pass over the counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import contract
from ..data import PerturbationData
from ..normalize import lognormalize, normalize_total

__all__ = ["COVARIATE_SEP", "cell_indices", "cell_means", "covariate_strings", "data_ate", "treatment_splits", "representable_labels"]


#: joins a cell's covariate values (``"line_1|donor_2"``)
COVARIATE_SEP = "|"


def covariate_strings(data: PerturbationData, idx: np.ndarray | None = None) -> np.ndarray:
    """Each cell's covariate values joined with ``"|"``."""
    spec = data.spec
    codes = data.covariates if idx is None else data.covariates[idx]
    cols = [np.asarray(cats, dtype=object)[codes[:, k]] for k, cats in enumerate(spec.covariate_categories)]
    if not cols:
        return np.full(codes.shape[0], "", dtype=object)
    out = cols[0].astype(str)
    for col in cols[1:]:
        out = np.char.add(np.char.add(out.astype(str), COVARIATE_SEP), col.astype(str))
    return np.asarray(out, dtype=object)



def cell_indices(data: PerturbationData, cells) -> np.ndarray:
    """Indices of the cells named by ``cells``: ``"all"``, ``"heldout"`` (val and test
    cells), a split name, or an array of cell indices (returned as is)."""
    if isinstance(cells, str):
        if cells == "all":
            return np.arange(data.n_cells)
        if cells == "heldout":
            return np.flatnonzero(data.split != "train")
        return data.indices(cells)
    return np.asarray(cells)


def data_ate(data: PerturbationData, cells="heldout", min_cells: int = 1, chunk: int = 4096) -> tuple[pd.DataFrame, pd.Series]:
    """Data ATE of every non-control label with at least ``min_cells`` cells.

    Args:
        data: encoded data.
        cells: ``"heldout"`` (val and test cells; default), ``"all"``, a split name, or
            an array of cell indices. A label (or the control) with no cell there falls
            back to all its cells.
        min_cells: labels with fewer cells are left out.

    Returns:
        ``(ate, n_cells)``: a DataFrame (labels x genes) and the cells used per label.
    """
    idx = cell_indices(data, cells)
    labels_all = data.label_names()
    control = data.spec.control

    def means(index: np.ndarray) -> tuple[dict, dict]:
        sums, counts = _sums(data, index, labels_all[index], chunk, normalized=False)
        return {k: v[0] for k, v in sums.items()}, counts

    sums, counts = means(idx)
    present = set(np.unique(labels_all))
    missing = sorted(present - set(counts))
    if missing:  # fall back to all cells of labels absent from the chosen cells
        extra = np.flatnonzero(np.isin(labels_all, missing))
        s2, c2 = means(extra)
        sums.update(s2)
        counts.update(c2)
    if control not in counts:
        raise ValueError(f"no control cells (label {control!r}) to compute the data ATE against")
    base = sums[control] / counts[control]
    order = [lab for lab in _label_order(data, counts) if lab != control and counts[lab] >= min_cells]
    ate = np.stack([sums[lab] / counts[lab] - base for lab in order]) if order else np.zeros((0, data.spec.n_genes))
    return (
        pd.DataFrame(ate, index=pd.Index(order, name="perturbation"), columns=data.spec.genes),
        pd.Series({lab: counts[lab] for lab in order}, name="n_cells"),
    )


def _sums(data: PerturbationData, index: np.ndarray, keys: np.ndarray, chunk: int, normalized: bool) -> tuple[dict, dict]:
    """Per key: the sums over its cells of the log-normalised (and, with ``normalized``,
    the normalised) expression, and its cell count; one pass over the counts."""
    sums: dict = {}
    counts: dict = {}
    for start in range(0, len(index), chunk):
        sub, sub_keys = index[start : start + chunk], keys[start : start + chunk]
        x = data.read_counts(sub).astype(np.float64)
        ln = lognormalize(x)
        norm = normalize_total(x) if normalized else None
        for key in np.unique(sub_keys):
            rows = sub_keys == key
            parts = [ln[rows].sum(0)] + ([norm[rows].sum(0)] if normalized else [])
            old = sums.get(key)
            sums[key] = parts if old is None else [a + b for a, b in zip(old, parts)]
            counts[key] = counts.get(key, 0) + int(rows.sum())
    return sums, counts


def cell_means(
    data: PerturbationData, idx: np.ndarray, keys: np.ndarray | None = None, chunk: int = 4096
) -> tuple[pd.Series, pd.DataFrame, pd.DataFrame]:
    """Mean expression of each group of the cells ``idx``, in both effect statistics' units.

    Args:
        data: encoded data.
        idx: cell indices.
        keys: ``(len(idx),)`` the group of each cell (default: its canonical label).
        chunk: cells read at a time.

    Returns:
        ``(n_cells, lognorm, normalized)``: per group (index sorted by key) the number of
        cells, the mean of ``log2(1 + 1e4 x / T)`` and the mean of ``1e4 x / T`` (counts
        per 1e4; T = the cell's total), each DataFrame groups x genes.
    """
    idx = np.asarray(idx, dtype=np.int64)
    keys = data.label_names(idx) if keys is None else np.asarray(keys)
    if keys.shape != idx.shape:
        raise ValueError(f"keys has shape {keys.shape}, expected {idx.shape} (one per cell of idx)")
    sums, counts = _sums(data, idx, keys, chunk, normalized=True)
    order = sorted(counts)
    G = data.spec.n_genes
    index = pd.Index(order, name="group")
    lognorm = np.stack([sums[k][0] / counts[k] for k in order]) if order else np.zeros((0, G))
    normalized = np.stack([sums[k][1] / counts[k] for k in order]) if order else np.zeros((0, G))
    return (
        pd.Series({k: counts[k] for k in order}, name="n_cells", dtype=np.int64).reindex(index),
        pd.DataFrame(lognorm, index=index, columns=data.spec.genes),
        pd.DataFrame(normalized, index=index, columns=data.spec.genes),
    )


def _label_order(data: PerturbationData, labels) -> list[str]:
    """Labels in vocabulary order (unknown ones after, sorted)."""
    labels = set(labels)
    known = [lab for lab in data.spec.labels if lab in labels]
    return known + sorted(labels - set(known))


def treatment_splits(data: PerturbationData) -> dict[str, str | None]:
    """``label -> "train" | "test" | None``: train if it has training cells, test if all
    its cells are test cells, None otherwise (e.g. only validation cells)."""
    labels = data.label_names()
    out: dict[str, str | None] = {}
    for lab in np.unique(labels):
        if lab == data.spec.control:
            continue
        splits = set(data.split[labels == lab].tolist())
        out[lab] = "train" if "train" in splits else ("test" if splits == {"test"} else None)
    return out


def representable_labels(model, data: PerturbationData, labels) -> tuple[list[str], dict[str, str]]:
    """Labels the model can predict, and a note for each one it cannot.

    A model that composes (``model.composes``, default True) predicts every label whose
    components are in its vocabulary. One that does not (each label its own treatment)
    predicts only labels it has training cells for.
    """
    notes: dict[str, str] = {}
    ok: list[str] = []
    composes = contract.composes(model)
    train_labels = set(data.label_names(data.indices("train")).tolist())
    vocab = set(data.spec.perturbations)
    for lab in labels:
        parts = [] if lab == data.spec.control else lab.split(data.spec.separator)
        if any(p not in vocab for p in parts):
            notes[lab] = "a component is not in the model's perturbation vocabulary"
        elif not composes and lab not in train_labels:
            notes[lab] = (
                "this model encodes each label as its own treatment (one-hot) and cannot "
                "compose a label it has no training cells for"
            )
        else:
            ok.append(lab)
    return ok, notes

