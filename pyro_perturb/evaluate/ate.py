"""Average treatment effects (ATE): from data, and from a model by posterior predictive.

Definitions (docs/evaluation.md, "Average treatment effects"):

* **Data ATE** of label t: normalise each cell to 1e4 counts, ``log2(1 + x)``, take the
  mean over the cells of t minus the mean over control cells
  (:func:`~.data_stats.data_ate`).
* **Model ATE**: a posterior predictive of that statistic under intervention. For each
  of ``num_particles`` particles the global latents are drawn from the guide, the basal
  state from the prior (the guide samples no local site when ``batch.x is None``), the
  dosage is set with :func:`pyro.poutine.do` to the treatment's (and to 0 for the
  control), the library is set (see "Sequencing depth" below), counts are sampled,
  normalised the same way and averaged over particles (:func:`~.predictive.model_ate`,
  through the model-effects API ``model_effects``). It runs as
  ``pyro.infer.Predictive`` (vectorised over particles) on the model's device, in blocks
  of particles (globals drawn once per block, shared by every treatment and the control)
  and batches of treatments sized to a working-memory budget
  (:func:`~.ate_memory.ate_batch_for_memory`). It is seeded, and each treatment draws
  its counts from its own stream, so its ATE does not depend on the batching or on the
  other treatments asked (bench/ate_benchmark.py measures it).

Combinations are first-class: the ATE of ``"A+B"`` is available whenever A and B are in
the vocabulary, because the dosage of ``"A+B"`` is ``d_A + d_B``. A model that cannot
compose (``model.composes = False``, e.g. SVAE+, where each label is its own treatment)
gets ``NaN`` rows (``null`` in JSON) with a note for labels it has no training cells for.

Treatment splits for the metrics: a label is "train" if it has training cells, "test" if
its cells are all in the test split (held-out combinations); "all" is every non-control
label. The data ATE used for the metrics comes from held-out cells (val and test) by
default, so that "model ATE tracks data ATE" is measured on cells the model never saw.

Sequencing depth: by default (``library="observed"``) the model draws each row's cells
at the library sizes of the observed cells that row is compared with (the label's
held-out cells, the held-out controls for the control row; :func:`.comparison.heldout_pools`),
because the mean of ``log2(1 + normalised)`` depends on depth: at 100-200 UMIs per cell
it is a different statistic from the one at 1e4. ``library=1e4`` (the paper's) is an
option; the output names the depth used.

Honest baselines: :mod:`.comparison` scores the model beside the baselines of
:mod:`.baselines` (training cells only) against held-out cells and held-out controls, in
both effect statistics, per group of labels (``results["comparison"]``, ``comparison.csv``).

Modules: :mod:`.data_stats` (data ATE, treatment splits, representable labels),
:mod:`.predictive` (model ATE), :mod:`.streams` (its per-row random streams),
:mod:`.ate_memory` (its working-memory model), :mod:`.baselines` and :mod:`.comparison`;
this one puts them together (:func:`ate_results`) and is the ``evaluate`` hook
(:func:`ate_evaluator`), which writes the CSVs, the posterior predictive check (netCDF)
and the plots.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import contract
from ..data import PerturbationData
from ..data.anndata import canonical_label
from .comparison import compare_effects, compare_units, comparison_frame, covariate_heldout_pools, heldout_pools
from .data_stats import covariate_strings, data_ate, representable_labels, treatment_splits
from .metrics import ate_metrics
from .ppc import posterior_predictive_check
from .predictive import ControlCells, default_particles, model_effects

__all__ = ["ATE_SPLITS", "ate_results", "ate_evaluator"]

#: where the model's basal states come from in an evaluation (see :func:`basal_cells`)
BASAL_OPTIONS = ("prior", "controls")
ATE_SPLITS = ("all", "train", "test")


def _split_metrics(data_df: pd.DataFrame, model_df: pd.DataFrame, labels: list[str]) -> dict:
    rows = [lab for lab in labels if lab in data_df.index and lab in model_df.index and np.isfinite(model_df.loc[lab].to_numpy()).all()]
    out = {"ate_n_treatments": len(rows)}
    if not rows:
        out.update({k: None for k in ("ate_pearson", "ate_r2", "ate_pearson_top20", "ate_r2_top20")})
        return out
    out.update(ate_metrics(data_df.loc[rows].to_numpy(), model_df.loc[rows].to_numpy(), top_n=20))
    return out


def ate_results(
    model,
    guide,
    data: PerturbationData,
    num_particles: int | None = None,
    seed: int = 0,
    device=None,
    data_cells="heldout",
    memory_mb: float | None = None,
    library="observed",
    basal: str = "prior",
) -> dict:
    """Data ATE, model ATE and metrics per treatment split, and the model beside the
    baselines (:func:`~.comparison.compare_effects`).

    Args:
        library: depth of the model's drawn cells: ``"observed"`` (default: per row, the
            library sizes of the held-out cells it is compared with,
            :func:`~.comparison.heldout_pools`) or a number (``1e4``: the paper's).
        basal: ``"prior"`` (default, the paper's: basal states from the model's prior) or
            ``"controls"``: each particle's basal state is a *training* control cell's
            posterior draw (of the same covariate values), decoded under each dosage
            (:class:`~.predictive.ControlCells`), for models that declare basal sites.
            Measured: no gain over the prior once the depth is matched
            (bench/results/real_data/real_data.md).

    Returns:
        dict with ``data`` and ``model`` (DataFrames; the model's has NaN rows for labels
        it cannot represent), ``splits`` (label -> split), ``metrics``
        (``{"all"|"train"|"test": {ate_pearson, ate_r2, ate_pearson_top20, ate_r2_top20,
        ate_n_treatments}}``), ``notes`` (label -> reason for a null), ``library`` (the
        depth, in words), ``prediction`` (the model's ``EffectPrediction``),
        ``comparison`` (the block of :func:`~.comparison.compare_effects`) and
        ``comparison_frames``, and, when the data carries a simulator's true ATE,
        ``true`` (DataFrame; at the observed depth when the model is and the simulator
        gives it) and ``metrics_true``.
    """
    observed_depth = _is_observed(library)
    data_df, n_cells = data_ate(data, cells=data_cells)
    labels = list(data_df.index)
    truth = _true_ate(data, observed_depth=observed_depth)
    if truth is not None:  # also predict labels only the simulator knows (no cells here)
        for lab in truth.index:
            if lab not in labels:
                try:
                    data.spec.dosage_of(lab)
                except ValueError:
                    continue
                labels.append(lab)
    ok, notes = representable_labels(model, data, labels)
    depth = heldout_pools(data, ok) if observed_depth else float(library)
    prediction = model_effects(model, guide, data.spec, ok, library=depth, num_particles=num_particles, seed=seed,
                               device=device, memory_mb=memory_mb, basal=basal_cells(model, data, basal),
                               **_estimator_option(model))
    model_df = prediction.ate.reindex(labels)
    splits = treatment_splits(data)
    groups = {
        "all": list(data_df.index),
        "train": [lab for lab in data_df.index if splits.get(lab) == "train"],
        "test": [lab for lab in data_df.index if splits.get(lab) == "test"],
    }
    metrics = {s: _split_metrics(data_df, model_df, groups[s]) for s in ATE_SPLITS}
    for s in ATE_SPLITS:
        missing = [lab for lab in groups[s] if lab in notes]
        if missing:
            metrics[s]["ate_n_unrepresentable"] = len(missing)
    out = {
        "data": data_df,
        "model": model_df,
        "n_cells": n_cells,
        "splits": splits,
        "metrics": metrics,
        "notes": notes,
        "library": prediction.library,
        "prediction": prediction,
    }
    library_option = "observed" if observed_depth else float(library)
    if data.spec.covariate_keys:
        # units are (covariate values, label) pairs, each predicted at its covariate values
        out["comparison"], out["comparison_frames"] = compare_units(
            data, _predictions_by_covariate(model, guide, data, ok, observed_depth, library, num_particles, seed,
                                            device, memory_mb, basal),
            library_option=library_option,
        )
    else:
        out["comparison"], out["comparison_frames"] = compare_effects(data, prediction, library_option=library_option)
    if truth is not None:
        truth = truth.loc[[lab for lab in truth.index if lab in model_df.index]]
        groups_t = {
            "all": list(truth.index),
            "train": [lab for lab in truth.index if splits.get(lab) == "train"],
            "test": [lab for lab in truth.index if splits.get(lab) == "test"],
        }
        out["true"] = truth
        out["metrics_true"] = {s: _split_metrics(truth, model_df, groups_t[s]) for s in ATE_SPLITS}
        out["metrics_data_vs_true"] = {s: _split_metrics(truth, data_df, groups_t[s]) for s in ATE_SPLITS}
    return out


def _estimator_option(model) -> dict:
    """``{"estimator": "sampled"}`` for a zero-inflated NB (the integrated estimator
    integrates NB or Poisson counts only), else ``{}`` (the default estimator)."""
    return {"estimator": "sampled"} if contract.likelihood_kind(model) == "zinb" else {}


def _is_observed(library) -> bool:
    """``"observed"`` or a positive number (the library of every drawn cell)."""
    if isinstance(library, str):
        if library != "observed":
            raise ValueError(f"ate_library must be 'observed' or a positive number, got {library!r}")
        return True
    if isinstance(library, bool) or not isinstance(library, (int, float, np.integer, np.floating)) or not library > 0:
        raise ValueError(f"ate_library must be 'observed' or a positive number, got {library!r}")
    return False


def basal_cells(model, data: PerturbationData, basal: str, covariates: str | None = None):
    """The ``basal`` argument of :func:`~.predictive.model_effects` for an evaluation:
    ``"prior"``, or the training control cells (of the covariate values ``covariates``)
    as :class:`~.predictive.ControlCells` when ``basal == "controls"`` and the model
    declares basal sites (else ``"prior"``)."""
    if basal not in BASAL_OPTIONS:
        raise ValueError(f"ate_basal must be one of {BASAL_OPTIONS}, got {basal!r}")
    if basal == "prior" or not contract.basal_sites(model):
        return "prior"
    train = data.indices("train")
    cells = train[data.label_names(train) == data.spec.control]
    if covariates is not None and len(cells):
        cells = cells[covariate_strings(data, cells).astype(str) == covariates]
    return ControlCells(data, cells) if len(cells) else "prior"


def _predictions_by_covariate(model, guide, data: PerturbationData, labels: list[str], observed_depth: bool, library,
                              num_particles: int, seed: int, device, memory_mb, basal: str = "prior") -> dict:
    """The model's effects at each covariate value with held-out cells: ``{covariate
    values: EffectPrediction}``, drawn at the depth of that covariate value's held-out
    cells (or the fixed library)."""
    heldout = np.flatnonzero(data.split != "train")
    covs = np.unique(covariate_strings(data, heldout).astype(str))
    out = {}
    for cov in covs:
        depth = covariate_heldout_pools(data, cov, labels) if observed_depth else float(library)
        out[str(cov)] = model_effects(model, guide, data.spec, labels, library=depth, num_particles=num_particles,
                                      seed=seed, device=device, memory_mb=memory_mb, covariates=str(cov),
                                      basal=basal_cells(model, data, basal, str(cov)), **_estimator_option(model))
    return out


def _true_ate(data: PerturbationData, observed_depth: bool = False) -> pd.DataFrame | None:
    """The simulator's true ATE, if the data has one: ``uns["ground_truth"]["ate"]`` (cells
    at library 1e4), or with ``observed_depth`` its ``"ate_observed_depth"`` (cells at the
    simulated depth) when present."""
    gt = getattr(data.adata, "uns", {}).get("ground_truth") if data.adata is not None else None
    if not isinstance(gt, dict) or "ate" not in gt or "ate_labels" not in gt:
        return None
    key = "ate_observed_depth" if observed_depth and "ate_observed_depth" in gt else "ate"
    ate = np.asarray(gt[key], dtype=np.float64)
    if ate.ndim != 2 or ate.shape[1] != data.spec.n_genes:
        return None
    labels = [canonical_label(str(lab), data.spec.control, data.spec.separator) for lab in gt["ate_labels"]]
    return pd.DataFrame(ate, index=pd.Index(labels, name="perturbation"), columns=data.spec.genes)


# ----------------------------------------------------------------------------- evaluator
def ate_evaluator(
    run, data: PerturbationData, results: dict, out_dir: Path | None, seed: int, options: dict | None = None
) -> None:
    """``evaluate`` hook: ATE metrics per treatment split, the model beside the baselines,
    CSVs, PPC export and plots.

    Adds ``results["ate"]`` = ``{"all"|"train"|"test": metrics, "notes": ...,
    "num_particles": ..., "library": ...}``, ``results["comparison"]`` (the block of
    :func:`~.comparison.compare_effects`), and copies the train / test treatment-split
    metrics into ``results["train"]`` / ``results["test"]``. Options
    (``evaluate_run(options=...)``): ``ate_particles`` (default 250: the integrated estimator's, see
    :func:`~.predictive.default_particles`), ``ate_library``
    (``"observed"``, default, or a number such as ``1e4``), ``ate_ppc`` (default True),
    ``ate_plots`` (default True), ``ppc_draws`` (default 30), ``ate_data_cells`` (default
    ``"heldout"``), ``ate_memory_mb`` (working-memory budget of the model ATE, default 1024),
    ``ate_basal`` (``"prior"``, default, or ``"controls"``: see :func:`ate_results`).
    """
    if data.spec.n_perturbations == 0:
        return
    if not contract.uses_dosage(run.model):
        # e.g. plain scVI: every treatment decodes like the control, the model ATE is zero
        results["ate"] = {"skipped": f"{type(run.model).__name__} ignores the dosage (contract.uses_dosage): "
                                     "its ATE is zero by construction"}
        return
    opts = dict(options or {})
    particles = opts.get("ate_particles")
    num_particles = int(default_particles("integrated") if particles is None else particles)
    memory_mb = opts.get("ate_memory_mb")
    library = opts.get("ate_library", "observed")
    basal = str(opts.get("ate_basal", "prior"))
    if library is None:
        library = "observed"
    res = ate_results(
        run.model, run.guide, data, num_particles=num_particles, seed=seed, device=run.device,
        data_cells=opts.get("ate_data_cells", "heldout"), memory_mb=None if memory_mb is None else float(memory_mb),
        library=library, basal=basal,
    )
    block = {s: res["metrics"][s] for s in ATE_SPLITS}
    block["num_particles"] = num_particles
    block["library"] = res["library"]
    block["basal"] = res["prediction"].basal
    block["ate_library"] = library if isinstance(library, str) else float(library)
    if memory_mb is not None:
        block["memory_mb"] = float(memory_mb)
    block["composes"] = contract.composes(run.model)
    block["data_cells"] = str(opts.get("ate_data_cells", "heldout"))
    if res["notes"]:
        block["notes"] = {lab: why for lab, why in res["notes"].items()}
    if data.spec.covariate_keys:
        block["covariates"] = (
            "the model ATE is computed at the first category of every covariate "
            f"({', '.join(f'{k}={c[0]}' for k, c in zip(data.spec.covariate_keys, data.spec.covariate_categories))}); "
            "the data ATE pools all cells"
        )
    if "metrics_true" in res:
        block["vs_true_ate"] = res["metrics_true"]
        block["data_vs_true_ate"] = res["metrics_data_vs_true"]
    results["ate"] = block
    results["comparison"] = res["comparison"]
    for s in ("train", "test"):
        if s in results and isinstance(results[s], dict):
            results[s].update({k: v for k, v in res["metrics"][s].items()})
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res["model"].to_csv(out_dir / "ate_model.csv")
    res["data"].to_csv(out_dir / "ate_data.csv")
    if "true" in res:
        res["true"].to_csv(out_dir / "ate_true.csv")
    if "skipped" not in res["comparison"]:
        comparison_frame(res["comparison"]).to_csv(out_dir / "comparison.csv", index=False)
    if opts.get("ate_ppc", True):
        idata = posterior_predictive_check(run.model, run.guide, data, seed=seed, device=run.device,
                                           num_draws=int(opts.get("ppc_draws", 30)))
        _export_netcdf(idata, out_dir / "ppc.nc")
        res["idata"] = idata
    if opts.get("ate_plots", True):
        from . import plots  # here, not at the top: matplotlib only when plotting

        plots.ate_scatter(res, out_dir / "ate_scatter.png", title=run.name)
        if "idata" in res:
            plots.ppc_plot(res["idata"], out_dir / "ppc_zero_fraction.png", var="zero_fraction")
        masks = contract.mask_probabilities(run.guide)
        if masks is not None:
            plots.mask_heatmap(contract.as_array(masks.probabilities), list(masks.labels), out_dir / "mask_heatmap.png")


def _export_netcdf(idata, path: Path) -> None:
    """Write ``idata`` to ``path`` (h5netcdf). The export is optional (the metrics, CSVs
    and plots do not depend on it), so a failure is a warning naming the file and the
    error, and leaves no partial file, instead of stopping the evaluation."""
    try:
        idata.to_netcdf(str(path), engine="h5netcdf")
    except Exception as err:  # noqa: BLE001 - any failure of the optional export (missing h5netcdf, disk, ...)
        Path(path).unlink(missing_ok=True)
        warnings.warn(f"could not write {path}: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
