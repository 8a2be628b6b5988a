"""Baseline effect predictions from training cells only (no model): what a model must beat.

Every baseline predicts, for each evaluated label, its effect on every gene in both effect
statistics of the evaluation (docs/evaluation.md, "Model against baselines"):

* ``lognorm_delta``: mean of ``log2(1 + 1e4 x / T)`` over the label's cells minus the same
  over control cells (the data ATE's statistic);
* ``pseudobulk_lfc``: ``log2(m_t + 1) - log2(m_control + 1)``, with ``m`` the mean
  normalised expression (counts per 1e4) of the cells
  (:func:`~pyro_perturb.normalize.pseudobulk_lfc`).

The baselines (:data:`BASELINES`), computed from the training split's cells:

* ``no_change``: every effect 0;
* ``mean_effect``: the mean, over the perturbation labels with training cells, of their
  training effect (the same prediction for every label);
* ``additive``: for a combination ``A+B``, the sum of its components' training effects;
  undefined (NaN row) for a single, or when a component has no training cells;
* ``empirical``: the label's own training effect (training cells of the label against
  training control cells); undefined for a label without training cells.

For data with covariates (e.g. cell line), ``covariate_additive``: each covariate value's
own training control plus the label's mean shift in the *other* covariate values
(:func:`covariate_additive`, the one implementation, also behind
:func:`pyro_perturb.evaluate.groups.additive_baseline`), pooled over the covariate values
of the evaluated cells in their proportions (:func:`baseline_effects`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..data import PerturbationData
from ..data.anndata import split_label
from ..normalize import pseudobulk_lfc
from .data_stats import cell_means, covariate_strings

__all__ = [
    "BASELINES",
    "STATISTICS",
    "baseline_effects",
    "covariate_additive",
    "effects_from_means",
]

#: the effect statistics, in report order
STATISTICS = ("lognorm_delta", "pseudobulk_lfc")
#: the baselines every evaluation reports (``covariate_additive`` too for data with covariates)
BASELINES = ("no_change", "mean_effect", "additive", "empirical")
_KEY_SEP = "\x1f"  # joins covariate values and label in group keys (no label holds it)


def effects_from_means(lognorm: pd.DataFrame, normalized: pd.DataFrame, control: str) -> dict[str, pd.DataFrame]:
    """Both effect statistics of every non-control row against the ``control`` row.

    Args:
        lognorm: rows (labels, control included) x genes: mean log-normalised expression.
        normalized: the same rows x genes: mean normalised expression (counts per 1e4).
        control: the control row.

    Returns:
        ``{"lognorm_delta": ..., "pseudobulk_lfc": ...}``, each (non-control rows) x genes.
    """
    if control not in lognorm.index or control not in normalized.index:
        raise ValueError(f"no control row {control!r} to compute effects against")
    rows = [lab for lab in lognorm.index if lab != control]
    return {
        "lognorm_delta": lognorm.loc[rows] - lognorm.loc[control],
        "pseudobulk_lfc": pseudobulk_lfc(normalized.loc[rows], normalized.loc[control]),
    }


def covariate_additive(
    means: Mapping[tuple[str, str], np.ndarray], cov: str, label: str, control: str
) -> np.ndarray | None:
    """Covariate-aware additive prediction of group (``cov``, ``label``):
    ``means[cov, control] + mean over other covariate values c' of
    (means[c', label] - means[c', control])``.

    ``means`` maps (covariate values, label) to a (G,) mean in a space where effects add
    (log-normalised means, or ``log2(1 + mean normalised expression)``); only training
    groups belong in it. For ``label == control`` the result is ``means[cov, control]``.
    ``None`` when it cannot be formed: no control of ``cov``, or no other covariate value
    with both the label and the control.
    """
    base = means.get((cov, control))
    if base is None:
        return None
    base = np.asarray(base, dtype=float)
    if label == control:
        return base
    shifts = [
        np.asarray(means[(c2, l2)], dtype=float) - np.asarray(means[(c2, control)], dtype=float)
        for (c2, l2) in means
        if l2 == label and c2 != cov and (c2, control) in means
    ]
    if not shifts:
        return None
    return base + np.mean(shifts, axis=0)


def _nan_frame(labels: list[str], genes: list[str]) -> pd.DataFrame:
    return pd.DataFrame(np.nan, index=pd.Index(labels, name="perturbation"), columns=genes)


def baseline_effects(
    data: PerturbationData, labels, eval_cells: np.ndarray | None = None
) -> dict[str, dict[str, pd.DataFrame]]:
    """Effects of ``labels`` predicted by every baseline, from the training cells only.

    Args:
        data: encoded data; its ``"train"`` split is all the baselines see.
        labels: the evaluated (non-control) labels.
        eval_cells: indices of the cells the predictions are compared with (the held-out
            cells of the labels and the held-out control cells). Only their covariate
            values are read (how many evaluated cells of each label and of the control
            have each covariate value), by ``covariate_additive``; default: the held-out
            (val and test) cells.

    Returns:
        ``{statistic: {predictor: DataFrame}}`` for ``statistic`` in :data:`STATISTICS`
        and ``predictor`` in :data:`BASELINES` (plus ``covariate_additive`` for data with
        covariates), each DataFrame labels x genes with NaN rows where the baseline is
        undefined (see the module docstring).

    Raises:
        ValueError: no training control cells.
    """
    labels = list(labels)
    spec = data.spec
    control, genes = spec.control, list(spec.genes)
    train = data.indices("train")
    _, ln, nm = cell_means(data, train)
    if control not in ln.index:
        raise ValueError(f"no training control cells (label {control!r}): the baselines need them")
    trained = effects_from_means(ln, nm, control)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for stat in STATISTICS:
        effects = trained[stat]
        preds = {"no_change": pd.DataFrame(0.0, index=pd.Index(labels, name="perturbation"), columns=genes)}
        mean = effects.mean(0).to_numpy() if len(effects) else np.full(len(genes), np.nan)
        preds["mean_effect"] = pd.DataFrame(
            np.broadcast_to(mean, (len(labels), len(genes))).copy(), index=pd.Index(labels, name="perturbation"), columns=genes
        )
        additive = _nan_frame(labels, genes)
        empirical = _nan_frame(labels, genes)
        for lab in labels:
            parts = split_label(lab, control, spec.separator)
            if len(parts) > 1 and all(p in effects.index for p in parts):
                additive.loc[lab] = effects.loc[parts].sum(0).to_numpy()
            if lab in effects.index:
                empirical.loc[lab] = effects.loc[lab].to_numpy()
        preds["additive"] = additive
        preds["empirical"] = empirical
        out[stat] = preds
    if spec.covariate_keys:
        eval_cells = np.flatnonzero(data.split != "train") if eval_cells is None else np.asarray(eval_cells)
        for stat, frame in _covariate_additive_effects(data, labels, train, eval_cells).items():
            out[stat]["covariate_additive"] = frame
    return out


def _covariate_additive_effects(data: PerturbationData, labels: list[str], train: np.ndarray, eval_cells: np.ndarray) -> dict:
    """``covariate_additive`` in both statistics, pooled over the evaluated cells' covariate
    values: the predicted mean of label t is ``sum_c w_t(c) pred(c, t)`` with ``w_t(c)``
    the share of t's evaluated cells with covariate values c (the control likewise), and
    the effect is computed from the two pooled means as for the data."""
    spec = data.spec
    control, genes = spec.control, list(spec.genes)
    keys = np.char.add(np.char.add(covariate_strings(data, train).astype(str), _KEY_SEP), data.label_names(train).astype(str))
    _, ln, nm = cell_means(data, train, keys=keys)
    pairs = [tuple(k.split(_KEY_SEP, 1)) for k in ln.index]
    ln_table = {pair: ln.iloc[i].to_numpy() for i, pair in enumerate(pairs)}
    # effects add in log2(1 + m) for the pseudobulk statistic
    log_table = {pair: np.log2(nm.iloc[i].to_numpy() + 1.0) for i, pair in enumerate(pairs)}
    eval_cov = covariate_strings(data, eval_cells).astype(str)
    eval_lab = data.label_names(eval_cells)

    def pooled(label: str) -> tuple[np.ndarray, np.ndarray] | None:
        covs, counts = np.unique(eval_cov[eval_lab == label], return_counts=True)
        if counts.sum() == 0:
            return None
        mean_ln, mean_nm = np.zeros(len(genes)), np.zeros(len(genes))
        for cov, n in zip(covs, counts):
            a = covariate_additive(ln_table, cov, label, control)
            b = covariate_additive(log_table, cov, label, control)
            if a is None or b is None:
                return None
            w = n / counts.sum()
            mean_ln += w * a
            mean_nm += w * (np.exp2(b) - 1.0)
        return mean_ln, mean_nm

    out = {stat: _nan_frame(labels, genes) for stat in STATISTICS}
    base = pooled(control)
    if base is None:
        return out
    for lab in labels:
        pred = pooled(lab)
        if pred is None:
            continue
        out["lognorm_delta"].loc[lab] = pred[0] - base[0]
        out["pseudobulk_lfc"].loc[lab] = pseudobulk_lfc(pred[1], base[1])
    return out
