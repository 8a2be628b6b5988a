"""Group means by counterfactual posterior predictive, for any model of the zoo with covariates.

The counterfactual interface
----------------------------
A *counterfactual request* is "cells of covariate values c under treatment t". The zoo
answers it generically from the model/guide contract (no per-model code needed):

1. build a :class:`~pyro_perturb.data.Batch` with ``x = None``, ``d`` the treatment's
   dosage, ``c`` the covariate codes and ``library`` the sequencing depths to predict at;
2. run the guide on it (guides sample their *global* latents, if any, and skip the local
   ones when ``x is None``), replay the model under that guide trace with
   ``observe=False``: locals come from the model's prior given (c, d), and the ``"x"``
   site is a draw of counts (or, for a Gaussian likelihood, of ``log1p(1e4 x / l)``);
3. normalise each draw like the data: ``log2(1 + 1e4 * x / sum(x))`` (a Gaussian
   likelihood's draws, :func:`pyro_perturb.contract.likelihood_kind`, are already
   ``ln(1 + 1e4 x / l)``: converted to log2).

Models that ignore covariates (no ``c`` in their prior or decoder) still answer, with
covariate-blind predictions.

Sequencing depth: group means are compared with observed cells at the observed depth
(docs/evaluation.md, "Sequencing depth"), so the library sizes of predicted cells are drawn from the observed
(training) cells of the same covariate values, not fixed at 1e4.

Contents: :func:`predict_lognorm`, :func:`predict_counterfactual` (Python API),
:func:`observed_group_means`, :func:`additive_baseline` (control mean of the covariate +
average shift of the treatment in the other covariates), and the evaluator
:func:`group_evaluator`, one of :data:`pyro_perturb.evaluate.EVALUATORS`
(``metrics.json`` keys ``group_r2``, ``group_r2_top20``, ``nmi_*``, ``ari_*``, ``dhsic*``;
files ``group_means_model.csv`` and ``group_means_data.csv``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from .. import contract
from ..data import Batch, PerturbationData
from ..normalize import LIBRARY, lognormalize
from .baselines import covariate_additive
from .data_stats import COVARIATE_SEP, covariate_strings
from .metrics import clustering_scores, de_genes, dhsic, group_r2

MIN_CELLS = 30  # groups with more than this many cells are scored
SEP = COVARIATE_SEP
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------- prediction


def predict_lognorm(model, guide, batch: Batch) -> torch.Tensor:
    """Posterior-predictive draws ``(B, G)`` of log2(1 + 1e4-normalised) expression for the
    batch's (d, c, library), with locals from the prior (see the module docstring)."""
    batch = replace(batch, x=None)
    guide_trace = poutine.trace(guide).get_trace(batch, observe=False)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch, observe=False)
    x = model_trace.nodes[contract.OBSERVED_SITE]["value"]
    if contract.likelihood_kind(model) == "gaussian":
        return x / _LN2  # the Gaussian models log1p(1e4 x / l) = ln(1 + y); log2 = ln / ln 2
    return lognormalize(x)


def _cov_codes(spec, covariates) -> tuple[int, ...]:
    """Covariate codes from a dict {key: value}, a tuple of values, or a ``"a|b"`` string."""
    if isinstance(covariates, dict):
        values = [covariates[k] for k in spec.covariate_keys]
    elif isinstance(covariates, str):
        values = covariates.split(SEP) if spec.covariate_keys else []
    else:
        values = list(covariates)
    if len(values) != len(spec.covariate_keys):
        raise ValueError(f"expected values for the covariates {spec.covariate_keys}, got {values!r}")
    codes = []
    for key, cats, v in zip(spec.covariate_keys, spec.covariate_categories, values):
        if str(v) not in cats:
            raise ValueError(f"covariate {key!r} has no value {v!r}; known: {cats[:10]}")
        codes.append(cats.index(str(v)))
    return tuple(codes)


def predict_counterfactual(
    run,
    covariates,
    treatment: str,
    n_cells: int = 500,
    library=None,
    data: PerturbationData | None = None,
    seed: int = 0,
    batch_size: int = 1024,
) -> np.ndarray:
    """Draws ``(n_cells, G)`` of log2(1 + 1e4-normalised) expression of cells with the given
    covariate values under ``treatment`` (a label such as ``"drugX"``, ``"A+B"`` or the
    control), by posterior predictive. Works for (c, t) pairs never seen together.

    Args:
        run: a :class:`~pyro_perturb.run.Run`.
        covariates: ``{key: value}``, a tuple of values in ``spec.covariate_keys`` order,
            or the values joined with ``"|"``.
        library: sequencing depths: an array (resampled to ``n_cells``), a number, or
            ``None``: drawn from the training cells of these covariate values in ``data``
            (1e4 when no data is given).
    """
    spec = run.spec
    codes = _cov_codes(spec, covariates)
    rng = np.random.default_rng(seed)
    if library is None:
        if data is not None:
            pool = _library_pools(data).get(codes)
            library = pool if pool is not None else data.library
        else:
            library = np.array([LIBRARY])
    library = np.atleast_1d(np.asarray(library, dtype=np.float64))
    lib = rng.choice(library, size=n_cells, replace=True)
    return _predict(run.model, run.guide, spec, codes, treatment, lib, seed, run.device, batch_size, mean=False)


def _predict(model, guide, spec, codes, label, lib, seed, device, batch_size, mean: bool):
    model.eval()
    guide.eval()
    out, total = [], None
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        pyro.set_rng_seed(seed)
        for start in range(0, len(lib), batch_size):
            sub = lib[start : start + batch_size]
            batch = spec.request_batch([label] * len(sub), sub, codes, device)
            draws = predict_lognorm(model, guide, batch).double()
            if mean:
                s = draws.sum(0)
                total = s if total is None else total + s
            else:
                out.append(draws.cpu().numpy())
    if mean:
        return (total / len(lib)).cpu().numpy()
    return np.concatenate(out)


# --------------------------------------------------------------------------- observed data


def _library_pools(data: PerturbationData) -> dict:
    """Observed library sizes per covariate codes (training cells; all cells if none)."""
    idx = data.indices("train")
    if len(idx) == 0:
        idx = np.arange(data.n_cells)
    pools: dict = {}
    keys = [tuple(r) for r in data.covariates[idx].tolist()]
    frame = pd.DataFrame({"key": keys, "lib": data.library[idx]})
    for key, part in frame.groupby("key", sort=False):
        pools[tuple(key)] = part["lib"].to_numpy()
    return pools


def observed_group_means(data: PerturbationData, idx: np.ndarray, chunk: int = 4096) -> pd.DataFrame:
    """Mean log2(1 + 1e4-normalised) expression per (covariates, label) group of ``idx``.

    Returns a DataFrame indexed by ``"cov|label"`` with gene columns and a leading
    ``n_cells`` column, plus attributes in columns ``_cov`` and ``_label``.
    """
    idx = np.asarray(idx)
    cov = covariate_strings(data, idx)
    lab = data.label_names(idx)
    keys = np.array([f"{c}{SEP}{l}" if c != "" else l for c, l in zip(cov, lab)], dtype=object)
    uniq, inv = np.unique(keys, return_inverse=True)
    G = data.spec.n_genes
    sums = np.zeros((len(uniq), G))
    for start in range(0, len(idx), chunk):
        sl = slice(start, start + chunk)
        # library sizes are the row sums, which lognormalize divides by
        rows = lognormalize(data.read_counts(idx[sl]).astype(np.float64))
        np.add.at(sums, inv[sl], rows)
    counts = np.bincount(inv, minlength=len(uniq))
    means = pd.DataFrame(sums / counts[:, None], index=pd.Index(uniq, name="group"), columns=data.spec.genes)
    first = np.array([np.flatnonzero(inv == g)[0] for g in range(len(uniq))])
    means.insert(0, "_label", lab[first])
    means.insert(0, "_cov", cov[first])
    means.insert(0, "n_cells", counts)
    return means


def additive_baseline(train_means: pd.DataFrame, cov: str, label: str, control: str) -> np.ndarray | None:
    """The plain baseline for group (cov, label), in log-normalised space:
    ``mean(cov, control) + mean over other covariates c' of [mean(c', label) - mean(c', control)]``
    from the training group means of :func:`observed_group_means`
    (:func:`~pyro_perturb.evaluate.baselines.covariate_additive`). ``None`` when it cannot be
    formed (no control of ``cov``, or no other covariate with both groups)."""
    genes = [c for c in train_means.columns if c not in ("n_cells", "_cov", "_label")]
    table = {(r["_cov"], r["_label"]): r[genes].to_numpy(dtype=float) for _, r in train_means.iterrows()}
    return covariate_additive(table, cov, label, control)


# --------------------------------------------------------------------------- the evaluator


def _score(obs: np.ndarray, pred: np.ndarray, control: np.ndarray | None):
    r2 = group_r2(obs, pred)
    top = group_r2(obs, pred, de_genes(obs, control, 20)) if control is not None else float("nan")
    return r2, top


def group_scores(
    run,
    data: PerturbationData,
    seed: int = 0,
    n_samples: int = 1000,
    min_cells: int = MIN_CELLS,
    splits=("train", "val", "test"),
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Group-mean R^2 of the model (and of :func:`additive_baseline`) per split.

    Returns ``(per_split, model_means, data_means)``: ``per_split[split]`` holds
    ``group_r2``, ``group_r2_top20`` (means over the split's groups with more than
    ``min_cells`` cells), ``group_r2_baseline``, ``group_r2_top20_baseline``,
    ``group_r2_anchored``, ``group_r2_top20_anchored`` (treated groups: the model's predicted
    response added to the observed control mean of the covariate values), ``n_groups``
    and ``groups`` (per-group values); the two frames hold one row per group of the whole
    data with more than ``min_cells`` cells (index ``"cov|label"``, gene columns).
    Top-20 DE genes are the group's largest |observed mean - observed control mean of its
    covariate values| (all cells of that control group).
    """
    spec = data.spec
    control = spec.control
    all_means = observed_group_means(data, np.arange(data.n_cells))
    train_means = observed_group_means(data, data.indices("train")) if len(data.indices("train")) else all_means
    controls = {r["_cov"]: r[spec.genes].to_numpy(dtype=float) for _, r in all_means.iterrows() if r["_label"] == control}
    pools = _library_pools(data)
    cache: dict = {}

    def model_mean(cov: str, label: str) -> np.ndarray:
        if (cov, label) not in cache:
            codes = _cov_codes(spec, cov)
            pool = pools.get(codes, data.library)
            lib = np.random.default_rng(seed).choice(pool, size=n_samples, replace=True)
            cache[(cov, label)] = _predict(run.model, run.guide, spec, codes, label, lib, seed, run.device, 1024, mean=True)
        return cache[(cov, label)]

    per_split = {}
    for split in splits:
        idx = data.indices(split)
        if len(idx) == 0:
            continue
        means = observed_group_means(data, idx)
        means = means[means["n_cells"] > min_cells]
        groups = {}
        for key, row in means.iterrows():
            cov, label = row["_cov"], row["_label"]
            if label not in spec.labels and any(p not in spec.perturbations for p in label.split(spec.separator)):
                continue
            obs = row[spec.genes].to_numpy(dtype=float)
            ctrl = controls.get(cov)
            pred = model_mean(cov, label)
            r2, top = _score(obs, pred, ctrl)
            entry = {"n_cells": int(row["n_cells"]), "r2": r2, "r2_top20": top}
            if ctrl is not None and label != control:
                # anchored: the model's response (c, t) - (c, control) added to the
                # observed control mean of c (docs/evaluation.md, "Group means")
                anchored = ctrl + pred - model_mean(cov, control)
                entry["r2_anchored"], entry["r2_top20_anchored"] = _score(obs, anchored, ctrl)
            base = additive_baseline(train_means, cov, label, control)
            if base is not None:
                entry["r2_baseline"], entry["r2_top20_baseline"] = _score(obs, base, ctrl)
            groups[key] = entry
        out = {"n_groups": len(groups), "groups": groups}
        for name in ("r2", "r2_top20", "r2_baseline", "r2_top20_baseline", "r2_anchored", "r2_top20_anchored"):
            vals = [g[name] for g in groups.values() if name in g and np.isfinite(g[name])]
            out["group_" + name] = float(np.mean(vals)) if vals else float("nan")
        per_split[split] = out

    rows = all_means[all_means["n_cells"] > min_cells]
    data_table = rows[spec.genes].copy()
    model_table = pd.DataFrame(
        np.stack([model_mean(r["_cov"], r["_label"]) for _, r in rows.iterrows()]) if len(rows) else np.zeros((0, spec.n_genes)),
        index=rows.index,
        columns=spec.genes,
    )
    return per_split, model_table, data_table


def block_scores(run, data: PerturbationData, idx: np.ndarray, seed: int = 0, max_cells: int = 2000,
                 n_permutations: int = 100) -> dict:
    """Clustering (NMI, ARI against covariate, treatment and their product) of each latent
    block, and dHSIC between blocks (``dhsic``, ``dhsic_pvalue``, and pairwise
    ``dhsic_A_B``), on up to ``max_cells`` cells of ``idx``."""
    rng = np.random.default_rng(seed)
    idx = np.asarray(idx)
    if len(idx) > max_cells:
        idx = np.sort(rng.choice(idx, max_cells, replace=False))
    if len(idx) < 4:
        return {}
    lat = run.latents(data, indices=idx)
    blocks = contract.latent_blocks(lat)
    if len(blocks) < 2:
        blocks = {"latent": lat[contract.LATENT_KEY]}
    cov = covariate_strings(data, idx)
    trt = data.label_names(idx)
    targets = {"covariate": cov, "treatment": trt, "product": np.array([f"{c}{SEP}{t}" for c, t in zip(cov, trt)])}
    out = {}
    for name, z in blocks.items():
        for tname, labels in targets.items():
            if len(np.unique(labels)) < 2 or len(np.unique(labels)) > len(idx):
                continue
            s = clustering_scores(z, labels, seed=seed)
            out[f"nmi_{name}_{tname}"] = s["nmi"]
            out[f"ari_{name}_{tname}"] = s["ari"]
    if len(blocks) >= 2:
        names = list(blocks)
        stat, p = dhsic([blocks[n] for n in names], n_permutations=n_permutations, seed=seed, max_cells=1000)
        out["dhsic"], out["dhsic_pvalue"] = stat, p
        if len(names) > 2:
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    s, pv = dhsic([blocks[names[i]], blocks[names[j]]], n_permutations=n_permutations, seed=seed, max_cells=1000)
                    out[f"dhsic_{names[i]}_{names[j]}"], out[f"dhsic_{names[i]}_{names[j]}_pvalue"] = s, pv
    return out


@torch.no_grad()
def group_evaluator(run, data: PerturbationData, results: dict, out_dir, seed: int, options: dict | None = None) -> None:
    """Group-mean R^2 (model and additive baseline), block clustering and dHSIC per split,
    for data with covariates; writes ``group_means_model.csv`` / ``group_means_data.csv``."""
    if not data.spec.covariate_keys:
        return
    per_split, model_table, data_table = group_scores(run, data, seed=seed)
    for split, scores in per_split.items():
        results.setdefault(split, {}).update(scores)
        results[split].update(block_scores(run, data, data.indices(split), seed=seed))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model_table.to_csv(out_dir / "group_means_model.csv")
        data_table.to_csv(out_dir / "group_means_data.csv")


__all__ = [
    "additive_baseline",
    "block_scores",
    "group_evaluator",
    "group_scores",
    "observed_group_means",
    "predict_counterfactual",
    "predict_lognorm",
]
