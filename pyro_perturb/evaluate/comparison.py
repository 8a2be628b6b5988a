"""The model beside honest baselines, on held-out cells, in both effect statistics.

Protocol (docs/evaluation.md, "Model against baselines"):

* **Observed effects** come from held-out cells only: for each label with val or test
  cells, the mean over those cells against the mean over the **held-out control cells**
  (never the training controls: a control shared by the observed effect and a baseline
  correlates their noise and flatters the baseline).
* **Baselines** (:mod:`.baselines`) see the training cells only.
* **The model's effects** are given (an ``EffectPrediction`` of the model-effects API),
  drawn at the depth chosen by the caller (:func:`.ate.ate_results`).

Both statistics of :data:`.baselines.STATISTICS` are scored, for three groups of labels
(:data:`GROUPS`): ``seen`` (labels with training cells), ``unseen`` (held-out labels
without training cells, e.g. held-out combinations) and ``all``. Metrics per predictor
(:data:`METRICS`): those of :func:`.metrics.perturbation_metrics` on the effects (deltas)
plus ``pearson``, the Pearson r over the pooled labels x genes (the ``ate_pearson`` of the
ATE metrics). :func:`comparison_table` renders the block for a person.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..data import PerturbationData
from ..normalize import pseudobulk_lfc
from .baselines import STATISTICS, baseline_effects, effects_from_means
from .data_stats import cell_means, covariate_strings
from .metrics import ate_metrics, perturbation_metrics

__all__ = [
    "GROUPS",
    "METRICS",
    "compare_effects",
    "compare_units",
    "comparison_frame",
    "comparison_table",
    "covariate_baseline_effects",
    "covariate_heldout_pools",
    "heldout_pools",
]

#: groups of evaluated labels
GROUPS = ("seen", "unseen", "all")
#: DE genes of the overlap and direction metrics (fewer when the data has fewer genes)
N_DE = 20
#: metric -> True when higher is better
METRICS = {
    "pearson_delta": True,
    "mse_delta": False,
    "mae_delta": False,
    "overlap_at_{n}": True,
    "de_direction_match_at_{n}": True,
    "discrimination_score_l1": True,
    "pearson": True,
}


def _metric_names(n_de: int) -> dict[str, bool]:
    return {name.format(n=n_de): higher for name, higher in METRICS.items()}


def _heldout_cells(data: PerturbationData) -> np.ndarray:
    return np.flatnonzero(data.split != "train")


def heldout_pools(data: PerturbationData, labels) -> dict[str, np.ndarray]:
    """Per row (the control and each label) the library sizes of the observed cells it is
    compared with: its held-out (val and test) cells, or all its cells when it has none
    held out; a label without any cell gets the control's pool."""
    names = data.label_names()
    heldout = data.split != "train"
    control = data.spec.control
    pools: dict[str, np.ndarray] = {}
    for row in [control] + [lab for lab in labels if lab != control]:
        own = names == row
        chosen = own & heldout if (own & heldout).any() else own
        pools[row] = data.library[chosen].astype(np.float64)
    for row, pool in pools.items():
        if pool.size == 0:
            pools[row] = pools[control]
    return pools


def _model_frames(prediction, labels: list[str], control: str) -> dict[str, pd.DataFrame]:
    lognorm = prediction.ate.reindex(labels)
    norm = prediction.normalized_mean
    if control in norm.index:
        lfc = pseudobulk_lfc(norm.reindex(labels), norm.loc[control])
    else:
        lfc = pd.DataFrame(np.nan, index=lognorm.index, columns=lognorm.columns)
    return {"lognorm_delta": lognorm, "pseudobulk_lfc": lfc}


def _finite_rows(frame: pd.DataFrame, labels: list[str]) -> list[str]:
    values = frame.reindex(labels).to_numpy()
    return [lab for lab, row in zip(labels, values) if np.isfinite(row).all()]


def _score(observed: np.ndarray, predicted: np.ndarray, n_de: int) -> dict[str, float]:
    pm = perturbation_metrics(observed, predicted, n_de=(n_de,))
    out = {name: float(pm[name]) for name in _metric_names(n_de) if name in pm}
    out["pearson"] = float(ate_metrics(observed, predicted, top_n=n_de)["ate_pearson"])
    out["pearson_delta_undefined"] = int(pm["pearson_delta_undefined"])
    return out


def _winner(entry: dict, predictors: list[str], n_de: int) -> dict:
    out = {}
    for metric, higher in _metric_names(n_de).items():
        model = entry.get("model", {}).get(metric)
        scored = [(p, entry[p][metric]) for p in predictors if p != "model" and p in entry and np.isfinite(entry[p].get(metric, np.nan))]
        if model is None or not np.isfinite(model) or not scored:
            continue
        best, value = (max if higher else min)(scored, key=lambda pv: pv[1])
        out[metric] = {
            "best_baseline": best,
            "best_baseline_value": value,
            "model": model,
            "model_wins": bool(model > value if higher else model < value),
        }
    return out


def _scored(block: dict, observed: dict, model: dict, baselines: dict, group_labels: dict, predictors: list[str],
            n_de: int) -> tuple[dict, dict]:
    """Fill ``block`` with every predictor's metrics per statistic and group of labels
    (a predictor is scored on a group only where it is defined for all its labels; the
    model on the labels it can represent); return ``(block, frames)``."""
    for stat in STATISTICS:
        frames = {"model": model[stat], **baselines[stat]}
        per_group = {}
        for group in GROUPS:
            labs = group_labels[group]
            entry: dict = {}
            model_labs = _finite_rows(frames["model"], labs)
            if model_labs and len(model_labs) < len(labs):
                entry["n_unrepresentable"] = len(labs) - len(model_labs)
                labs = model_labs
            entry["n_labels"] = len(labs)
            if labs:
                obs = observed[stat].loc[labs].to_numpy()
                for name in predictors:
                    if len(_finite_rows(frames[name], labs)) == len(labs):
                        entry[name] = _score(obs, frames[name].loc[labs].to_numpy(), n_de)
                entry["winner"] = _winner(entry, predictors, n_de)
            entry["labels"] = labs
            per_group[group] = entry
        block[stat] = per_group
    out_frames = {"observed": observed, "model": model}
    for name in predictors[1:]:
        out_frames[name] = {stat: baselines[stat][name] for stat in STATISTICS}
    return block, out_frames


def compare_effects(data: PerturbationData, prediction, library_option="observed") -> tuple[dict, dict]:
    """Model and baselines against the observed effects of held-out cells.

    Args:
        data: encoded data (its split defines training and held-out cells).
        prediction: the model's ``EffectPrediction`` (``ate``: labels x genes;
            ``normalized_mean``: rows [control] + labels) for the held-out labels it can
            represent; labels it lacks are left out of its scores.
        library_option: the ``ate_library`` the model was drawn at, reported as is.

    Returns:
        ``(block, frames)``. ``block``: ``{statistic: {group: {"n_labels", "labels",
        predictor: {metric: value, ...}, "winner": {metric: {...}}}}}`` plus ``library``,
        ``ate_library``, ``control_cells`` (held-out controls), ``training_control_cells``,
        ``n_de``, ``statistics``, ``groups``, ``predictors``; or ``{"skipped": reason}``
        (with a UserWarning) when there is no held-out control cell. ``frames``:
        ``{"observed"|predictor: {statistic: labels x genes}}``.
    """
    spec = data.spec
    control = spec.control
    heldout = _heldout_cells(data)
    n_cells, ln, nm = cell_means(data, heldout)
    n_train_controls = int(np.sum(data.label_names(data.indices("train")) == control))
    if control not in n_cells.index:
        reason = (
            f"no held-out control cells (label {control!r} has no val or test cell): observed effects would be "
            "measured against the training controls the baselines also use; the model-vs-baseline comparison "
            "is skipped. Hold some controls out (from_anndata's heldout_control_fraction)"
        )
        warnings.warn(reason, UserWarning, stacklevel=3)
        return {"skipped": reason, "control_cells": 0, "training_control_cells": n_train_controls}, {}
    observed = effects_from_means(ln, nm, control)
    labels = list(observed["lognorm_delta"].index)
    train_labels = set(data.label_names(data.indices("train")).tolist())
    group_labels = {
        "seen": [lab for lab in labels if lab in train_labels],
        "unseen": [lab for lab in labels if lab not in train_labels],
        "all": labels,
    }
    baselines = baseline_effects(data, labels, eval_cells=heldout)
    model = _model_frames(prediction, labels, control)
    predictors = ["model"] + list(baselines[STATISTICS[0]])
    n_de = min(N_DE, spec.n_genes)
    block: dict = {
        "library": prediction.library,
        "basal": prediction.basal,
        "ate_library": library_option,
        "control_cells": int(n_cells[control]),
        "training_control_cells": n_train_controls,
        "n_de": n_de,
        "statistics": list(STATISTICS),
        "groups": list(GROUPS),
        "predictors": predictors,
    }
    return _scored(block, observed, model, baselines, group_labels, predictors, n_de)


def comparison_frame(block: dict) -> pd.DataFrame:
    """The block as a long table: one row per statistic x group x predictor, with
    ``n_labels`` and a column per metric (``comparison.csv``)."""
    rows = []
    for stat in block.get("statistics", []):
        for group in block.get("groups", []):
            entry = block[stat][group]
            for name in block["predictors"]:
                if name in entry:
                    rows.append({"statistic": stat, "group": group, "predictor": name,
                                 "n_labels": entry["n_labels"], **entry[name]})
    return pd.DataFrame(rows)


def comparison_table(block: dict, metrics: list[str] | None = None, groups: list[str] | None = None) -> str:
    """The block for a person: per statistic and group, one line per metric with the model
    beside each baseline; ``*`` marks the best value of the line (``-`` where a predictor
    is undefined for the group's labels)."""
    if not block:
        return ""
    if "skipped" in block:
        return f"model vs baselines: skipped ({block['skipped']})"
    n_de = block["n_de"]
    names = _metric_names(n_de)
    metrics = [m for m in (metrics or list(names)) if m in names]
    predictors = block["predictors"]
    lines = [
        f"model vs baselines: held-out cells of each label against {block['control_cells']} held-out control "
        f"cells; baselines from training cells; model drawn at {block['library']}, basal states from "
        f"{block.get('basal', 'prior')}"
    ]
    width = max(len(m) for m in metrics) + 2
    for stat in block["statistics"]:
        for group in groups or block["groups"]:
            entry = block[stat][group]
            if not entry["n_labels"]:
                continue
            shown = [p for p in predictors if p in entry]
            lines.append(f"{stat}, {group} labels ({entry['n_labels']}):")
            col = {p: max(11, len(p) + 2) for p in shown}
            lines.append(" " * (width + 2) + "".join(p.rjust(col[p]) for p in shown))
            for metric in metrics:
                values = {p: entry[p].get(metric, np.nan) for p in shown}
                finite = {p: v for p, v in values.items() if np.isfinite(v)}
                best = None
                if finite:
                    best = (max if names[metric] else min)(finite, key=finite.get)
                cells = "".join(
                    ((f"{v:.3f}" if np.isfinite(v) else "-") + ("*" if p == best else " ")).rjust(col[p]) for p, v in values.items()
                )
                lines.append(f"  {metric:<{width}}{cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------ data with covariates
#: joins a unit's covariate values and its label in unit names ("A172 / MAPK1")
UNIT_SEP = " / "


def covariate_units(data: PerturbationData, idx: np.ndarray) -> np.ndarray:
    """Each cell's unit, ``"<covariate values> / <label>"`` (:data:`UNIT_SEP`)."""
    return np.char.add(np.char.add(covariate_strings(data, idx).astype(str), UNIT_SEP), data.label_names(idx).astype(str))


def _split_unit(unit: str) -> tuple[str, str]:
    cov, label = unit.split(UNIT_SEP, 1)
    return cov, label


def covariate_heldout_pools(data: PerturbationData, cov: str, labels) -> dict[str, np.ndarray]:
    """:func:`heldout_pools` restricted to the cells of one covariate value ``cov``
    (falling back to all cells of a row's label, then to the control's pool)."""
    names = data.label_names()
    in_cov = covariate_strings(data).astype(str) == cov
    heldout = data.split != "train"
    control = data.spec.control
    pools: dict[str, np.ndarray] = {}
    for row in [control] + [lab for lab in labels if lab != control]:
        for mask in (in_cov & heldout & (names == row), in_cov & (names == row), names == row):
            if mask.any():
                pools[row] = data.library[mask].astype(np.float64)
                break
    for row in [control] + list(labels):
        if row not in pools:
            pools[row] = pools[control]
    return pools


def _unit_effects(means_ln: pd.DataFrame, means_nm: pd.DataFrame, control: str) -> dict[str, pd.DataFrame]:
    """Both effect statistics of every (cov, label) unit against its covariate's control unit."""
    rows, ln_rows, lfc_rows = [], [], []
    for unit in means_ln.index:
        cov, label = _split_unit(unit)
        base = f"{cov}{UNIT_SEP}{control}"
        if label == control or base not in means_ln.index:
            continue
        rows.append(unit)
        ln_rows.append(means_ln.loc[unit].to_numpy() - means_ln.loc[base].to_numpy())
        lfc_rows.append(pseudobulk_lfc(means_nm.loc[unit].to_numpy(), means_nm.loc[base].to_numpy()))
    index = pd.Index(rows, name="unit")
    genes = means_ln.columns
    G = len(genes)
    return {
        "lognorm_delta": pd.DataFrame(np.stack(ln_rows) if rows else np.zeros((0, G)), index=index, columns=genes),
        "pseudobulk_lfc": pd.DataFrame(np.stack(lfc_rows) if rows else np.zeros((0, G)), index=index, columns=genes),
    }


def covariate_baseline_effects(data: PerturbationData, units: list[str]) -> dict[str, dict[str, pd.DataFrame]]:
    """The baselines of :mod:`.baselines` per (covariate value, label) unit, from training
    cells only, each against its own covariate value's training controls:
    ``no_change``; ``mean_effect`` (mean training effect of the perturbations in that
    covariate value); ``empirical`` (the unit's own training effect); ``additive`` (a
    combination's singles summed, within the covariate value); and ``covariate_additive``
    (the label's mean training effect in the *other* covariate values, the "cell line's
    control + the perturbation's mean shift elsewhere" baseline)."""
    spec = data.spec
    control, genes = spec.control, list(spec.genes)
    train = data.indices("train")
    _, ln, nm = cell_means(data, train, keys=covariate_units(data, train))
    trained = _unit_effects(ln, nm, control)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    index = pd.Index(units, name="unit")
    for stat in STATISTICS:
        effects = trained[stat]
        by_cov: dict[str, dict[str, np.ndarray]] = {}
        for unit in effects.index:
            cov, label = _split_unit(unit)
            by_cov.setdefault(cov, {})[label] = effects.loc[unit].to_numpy()
        frames = {name: pd.DataFrame(np.nan, index=index, columns=genes)
                  for name in ("no_change", "mean_effect", "additive", "empirical", "covariate_additive")}
        frames["no_change"].loc[:, :] = 0.0
        for unit in units:
            cov, label = _split_unit(unit)
            own = by_cov.get(cov, {})
            if own:
                frames["mean_effect"].loc[unit] = np.mean(list(own.values()), axis=0)
            if label in own:
                frames["empirical"].loc[unit] = own[label]
            parts = label.split(spec.separator)
            if len(parts) > 1 and all(p in own for p in parts):
                frames["additive"].loc[unit] = np.sum([own[p] for p in parts], axis=0)
            others = [effects_c[label] for c, effects_c in by_cov.items() if c != cov and label in effects_c]
            if others:
                frames["covariate_additive"].loc[unit] = np.mean(others, axis=0)
        out[stat] = frames
    return out


def compare_units(data: PerturbationData, predictions: dict, library_option="observed") -> tuple[dict, dict]:
    """:func:`compare_effects` for data with covariates: the evaluated units are
    (covariate values, label) pairs with held-out cells, each measured against the
    held-out controls of the same covariate values; ``predictions`` maps each covariate
    value string (:func:`~.data_stats.covariate_strings`) to the model's
    ``EffectPrediction`` drawn at that covariate value. Groups: ``seen`` units have
    training cells, ``unseen`` units have none (a held-out cell line x perturbation pair).
    Same block layout as :func:`compare_effects` (labels are unit names)."""
    spec = data.spec
    control = spec.control
    heldout = _heldout_cells(data)
    n_cells, ln, nm = cell_means(data, heldout, keys=covariate_units(data, heldout))
    control_units = [u for u in n_cells.index if _split_unit(u)[1] == control]
    train = data.indices("train")
    train_units = set(covariate_units(data, train).tolist())
    n_train_controls = int(np.sum(data.label_names(train) == control))
    if not control_units:
        reason = (
            f"no held-out control cells (label {control!r}) in any covariate value: the model-vs-baseline "
            "comparison is skipped. Hold some controls out (from_anndata's heldout_control_fraction)"
        )
        warnings.warn(reason, UserWarning, stacklevel=3)
        return {"skipped": reason, "control_cells": 0, "training_control_cells": n_train_controls}, {}
    observed = _unit_effects(ln, nm, control)
    units = list(observed["lognorm_delta"].index)
    group_units = {
        "seen": [u for u in units if u in train_units],
        "unseen": [u for u in units if u not in train_units],
        "all": units,
    }
    baselines = covariate_baseline_effects(data, units)
    genes = list(spec.genes)
    model = {stat: pd.DataFrame(np.nan, index=pd.Index(units, name="unit"), columns=genes) for stat in STATISTICS}
    libraries = set()
    for unit in units:
        cov, label = _split_unit(unit)
        prediction = predictions.get(cov)
        if prediction is None:
            continue
        libraries.add(prediction.library)
        frames = _model_frames(prediction, [label], control)
        for stat in STATISTICS:
            model[stat].loc[unit] = frames[stat].loc[label].to_numpy()
    predictors = ["model"] + list(baselines[STATISTICS[0]])
    n_de = min(N_DE, spec.n_genes)
    block: dict = {
        "units": "covariate values x label",
        "library": "; ".join(sorted(libraries)) if libraries else "none",
        "basal": "; ".join(sorted({p.basal for p in predictions.values()})) if predictions else "prior",
        "ate_library": library_option,
        "control_cells": int(sum(n_cells[u] for u in control_units)),
        "training_control_cells": n_train_controls,
        "n_de": n_de,
        "statistics": list(STATISTICS),
        "groups": list(GROUPS),
        "predictors": predictors,
    }
    return _scored(block, observed, model, baselines, group_units, predictors, n_de)
