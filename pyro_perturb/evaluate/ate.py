"""Average treatment effects (ATE): from data, and from a model by posterior predictive.

Definitions (MODELS.md section 4):

* **Data ATE** of label t: normalise each cell to 1e4 counts, ``log2(1 + x)``, take the
  mean over the cells of t minus the mean over control cells (:func:`data_ate`).
* **Model ATE**: a posterior predictive of that statistic under intervention. For each
  of ``num_particles`` particles the global latents are drawn from the guide, the basal
  state from the prior (the guide samples no local site when ``batch.x is None``), the
  dosage is set with :func:`pyro.poutine.do` to the treatment's (and to 0 for the
  control), the library is fixed at 1e4, counts are sampled, normalised the same way and
  averaged over particles (:func:`model_ate`). It runs as ``pyro.infer.Predictive``
  (vectorised over particles) on the model's device, in chunks of treatments and
  particles so that memory stays bounded, and is seeded.

Combinations are first-class: the ATE of ``"A+B"`` is available whenever A and B are in
the vocabulary, because the dosage of ``"A+B"`` is ``d_A + d_B``. A model that cannot
compose (``model.composes = False``, e.g. SVAE+, where each label is its own treatment)
gets ``NaN`` rows (``null`` in JSON) with a note for labels it has no training cells for.

Treatment splits for the metrics: a label is "train" if it has training cells, "test" if
its cells are all in the test split (held-out combinations); "all" is every non-control
label. The data ATE used for the metrics comes from held-out cells (val and test) by
default, so that "model ATE tracks data ATE" is measured on cells the model never saw.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Predictive

from ..data import Batch, PerturbationData
from ..data.anndata import canonical_label
from .metrics import ate_metrics

__all__ = [
    "LIBRARY",
    "lognormalize",
    "data_ate",
    "treatment_splits",
    "model_ate",
    "representable_labels",
    "ate_results",
    "ate_evaluator",
]

#: library size at which model counts are drawn, and to which every cell is normalised
LIBRARY = 1e4
#: the paper's particle count for the model ATE
DEFAULT_PARTICLES = 2500
#: upper bound on particles x cells x genes entries held at once
_BUDGET = 8_000_000
ATE_SPLITS = ("all", "train", "test")


# ----------------------------------------------------------------------------- data ATE
def lognormalize(counts: torch.Tensor | np.ndarray, scale: float = LIBRARY):
    """``log2(1 + scale * x / sum_g x)`` per cell (last axis = genes)."""
    if isinstance(counts, np.ndarray):
        total = np.maximum(counts.sum(-1, keepdims=True), 1.0)
        return np.log2(1.0 + counts / total * scale)
    total = counts.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.log2(1.0 + counts / total * scale)


def _cells(data: PerturbationData, cells) -> np.ndarray:
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
    idx = _cells(data, cells)
    labels_all = data.label_names()
    control = data.spec.control

    def means(index: np.ndarray) -> tuple[dict, dict]:
        sums, counts = {}, {}
        labs = labels_all[index]
        for start in range(0, len(index), chunk):
            sub, sub_labs = index[start : start + chunk], labs[start : start + chunk]
            ln = lognormalize(data.read_counts(sub).astype(np.float64))
            for lab in np.unique(sub_labs):
                rows = sub_labs == lab
                sums[lab] = sums.get(lab, 0.0) + ln[rows].sum(0)
                counts[lab] = counts.get(lab, 0) + int(rows.sum())
        return sums, counts

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
    composes = bool(getattr(model, "composes", True))
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


# ----------------------------------------------------------------------------- model ATE
class _DosageSite:
    """The model with its dosage as a sample site ``"d"`` that ``poutine.do`` can set."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, batch: Batch):
        d = pyro.sample("d", dist.Delta(batch.d, event_dim=2))
        return self.model(replace(batch, d=d), observe=False)


@torch.no_grad()
def model_ate(
    model,
    guide,
    spec,
    labels: list[str],
    num_particles: int = DEFAULT_PARTICLES,
    seed: int = 0,
    device: torch.device | str | None = None,
    library: float = LIBRARY,
    treatment_batch: int | None = None,
    particle_batch: int | None = None,
) -> pd.DataFrame:
    """Model ATE of ``labels`` (combinations included) by posterior predictive.

    For each chunk of treatments a batch with the control first and one row per
    treatment is built (``x = None``, library ``library``); ``Predictive`` runs the guide
    (globals) and the model (basal state from the prior, counts sampled) vectorised over
    a chunk of particles, with ``poutine.do`` setting the dosage site. The control mean is
    pooled over every chunk. Memory: ``particle_batch x (treatment_batch + 1) x genes``
    stays near 8 million entries unless set.

    Returns:
        DataFrame (labels x genes), the ATE in log2(1 + normalised counts) units.
    """
    labels = list(labels)
    if device is None:
        device = next(iter(model.parameters()), torch.zeros(0)).device
    device = torch.device(device)
    model.eval()
    guide.eval()
    G = spec.n_genes
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    if treatment_batch is None:
        treatment_batch = max(1, min(len(labels) or 1, 64))
    if particle_batch is None:
        particle_batch = max(1, min(num_particles, _BUDGET // ((treatment_batch + 1) * G)))
    sampler = _DosageSite(model)
    treated = np.zeros((len(labels), G))
    control_sum = torch.zeros(G, dtype=torch.float64, device=device)
    control_n = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pyro.set_rng_seed(seed)
        for start in range(0, len(labels), treatment_batch):
            chunk = labels[start : start + treatment_batch]
            batch = spec.request_batch([spec.control] + chunk, library, device=device)
            # the model's own dosage is the control's; the intervention sets each row's
            intervened = poutine.do(sampler, data={"d": batch.d})
            base = replace(batch, d=torch.zeros_like(batch.d))
            acc = torch.zeros((len(chunk) + 1, G), dtype=torch.float64, device=device)
            for p0 in range(0, num_particles, particle_batch):
                k = min(particle_batch, num_particles - p0)
                predictive = Predictive(intervened, guide=guide, num_samples=k, parallel=True, return_sites=("x",))
                x = predictive(base)["x"]
                x = x.reshape(k, len(chunk) + 1, G)
                acc += lognormalize(x.double()).sum(0)
            control_sum += acc[0]
            control_n += num_particles
            treated[start : start + len(chunk)] = (acc[1:] / num_particles).cpu().numpy()
    if not labels:
        return pd.DataFrame(np.zeros((0, G)), columns=spec.genes)
    control_mean = (control_sum / control_n).cpu().numpy()
    return pd.DataFrame(treated - control_mean, index=pd.Index(labels, name="perturbation"), columns=spec.genes)


# ----------------------------------------------------------------------------- metrics
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
    num_particles: int = DEFAULT_PARTICLES,
    seed: int = 0,
    device=None,
    data_cells="heldout",
) -> dict:
    """Data ATE, model ATE and metrics per treatment split.

    Returns:
        dict with ``data`` and ``model`` (DataFrames; the model's has NaN rows for labels
        it cannot represent), ``splits`` (label -> split), ``metrics``
        (``{"all"|"train"|"test": {ate_pearson, ate_r2, ate_pearson_top20, ate_r2_top20,
        ate_n_treatments}}``), ``notes`` (label -> reason for a null), and, when the data
        carries a simulator's true ATE, ``true`` (DataFrame) and ``metrics_true``.
    """
    data_df, n_cells = data_ate(data, cells=data_cells)
    labels = list(data_df.index)
    truth = _true_ate(data)
    if truth is not None:  # also predict labels only the simulator knows (no cells here)
        for lab in truth.index:
            if lab not in labels:
                try:
                    data.spec.dosage_of(lab)
                except ValueError:
                    continue
                labels.append(lab)
    ok, notes = representable_labels(model, data, labels)
    pred = model_ate(model, guide, data.spec, ok, num_particles=num_particles, seed=seed, device=device)
    model_df = pred.reindex(labels)
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
    }
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


def _true_ate(data: PerturbationData) -> pd.DataFrame | None:
    """The simulator's true ATE (``uns["ground_truth"]["ate"]``), if the data has one."""
    gt = getattr(data.adata, "uns", {}).get("ground_truth") if data.adata is not None else None
    if not isinstance(gt, dict) or "ate" not in gt or "ate_labels" not in gt:
        return None
    ate = np.asarray(gt["ate"], dtype=np.float64)
    if ate.ndim != 2 or ate.shape[1] != data.spec.n_genes:
        return None
    labels = [canonical_label(str(lab), data.spec.control, data.spec.separator) for lab in gt["ate_labels"]]
    return pd.DataFrame(ate, index=pd.Index(labels, name="perturbation"), columns=data.spec.genes)


# ----------------------------------------------------------------------------- evaluator
def ate_evaluator(
    run, data: PerturbationData, results: dict, out_dir: Path | None, seed: int, options: dict | None = None
) -> None:
    """``evaluate`` hook: ATE metrics per treatment split, CSVs, PPC export and plots.

    Adds ``results["ate"]`` = ``{"all"|"train"|"test": metrics, "notes": ...,
    "num_particles": ...}`` and copies the train / test treatment-split metrics into
    ``results["train"]`` / ``results["test"]``. Options (``evaluate_run(options=...)``):
    ``ate_particles`` (default 2500), ``ate_ppc`` (default True), ``ate_plots`` (default
    True), ``ppc_draws`` (default 30), ``ate_data_cells`` (default ``"heldout"``).
    """
    if data.spec.n_perturbations == 0:
        return
    opts = dict(options or {})
    num_particles = int(opts.get("ate_particles", DEFAULT_PARTICLES))
    res = ate_results(
        run.model, run.guide, data, num_particles=num_particles, seed=seed, device=run.device,
        data_cells=opts.get("ate_data_cells", "heldout"),
    )
    block = {s: res["metrics"][s] for s in ATE_SPLITS}
    block["num_particles"] = num_particles
    block["composes"] = bool(getattr(run.model, "composes", True))
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
    if opts.get("ate_ppc", True):
        from .ppc import posterior_predictive_check

        idata = posterior_predictive_check(run.model, run.guide, data, seed=seed, device=run.device,
                                           num_draws=int(opts.get("ppc_draws", 30)))
        try:
            idata.to_netcdf(str(out_dir / "ppc.nc"), engine="h5netcdf")
        except Exception:  # noqa: BLE001 - the export is optional; the plots still come
            pass
        res["idata"] = idata
    if opts.get("ate_plots", True):
        from . import plots

        plots.ate_scatter(res, out_dir / "ate_scatter.png", title=run.name)
        if "idata" in res:
            plots.ppc_plot(res["idata"], out_dir / "ppc_zero_fraction.png", var="zero_fraction")
        probs = getattr(run.guide, "mask_probabilities", None)
        if probs is not None:
            plots.mask_heatmap(probs().cpu().numpy(), list(data.spec.perturbations), out_dir / "mask_heatmap.png")


__all__.append("DEFAULT_PARTICLES")
