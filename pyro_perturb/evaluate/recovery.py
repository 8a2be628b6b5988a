"""Latent recovery and target identification against a simulator's ground truth
(docs/evaluation.md, "Latent recovery" and "Target identification"), for any model.

Runs when the data carries ``obsm["z_true"]`` and ``uns["ground_truth"]["targets"]``
(:func:`pyro_perturb.data.simulate.sparse_shift` and the other simulators). Adds to
``results[split]`` for each split with cells:

* ``mcc_pearson``, ``mcc_spearman``: mean matched |correlation| between true and
  posterior-mean latents (Hungarian matching, :func:`~.metrics.match_latents`);
* ``linear_r2``: R^2 of the true latents regressed linearly on the inferred ones;

and to the ``train`` and ``val`` entries (the targets are global; the matching is the one
found on the training cells) ``target_precision``, ``target_recall``, ``target_f1`` over
the perturbations seen in training (held-out perturbations' parameters are untrained
before a transfer, :mod:`pyro_perturb.infer.transfer`).

Where the inferred targets come from (:func:`inferred_targets`): the pair's
:func:`pyro_perturb.contract.target_scores` (scores, is_mask, row labels); masks are
called targets where > 0.5, magnitudes by the top-k per row (k = the perturbation's true
number of targets, an oracle the masks do not get). Pairs without target scores (VAE,
beta-VAE, conditional VAE) are scored by the empirical shift ``|mean latent of the
label's cells - mean latent of the control cells|``, top-k.
"""

from __future__ import annotations

import numpy as np

from .. import contract
from ..data.anndata import SPLITS
from .blocks import block_recovery_metrics
from .metrics import linear_r2, match_latents, target_identification

#: cells used for the correlations (a seeded subsample above this; ranks are O(n log n))
MAX_CELLS = 20_000


def has_ground_truth(data) -> bool:
    adata = data.adata
    gt = adata.uns.get("ground_truth") if hasattr(adata, "uns") else None
    return isinstance(gt, dict) and "targets" in gt and "z_true" in adata.obsm


def inferred_targets(run, latents: np.ndarray, data) -> tuple[np.ndarray, bool, list[str]]:
    """``(scores (R, L), is_mask, row label names)`` of a trained run (see module doc)."""
    declared = contract.target_scores(run.model, run.guide)
    if declared is not None:
        return declared.scores, declared.is_mask, declared.labels
    # empirical shifts from the posterior means, per label, relative to the controls
    codes = data.labels
    control = latents[codes == 0].mean(0) if np.any(codes == 0) else latents.mean(0)
    scores = np.zeros((len(run.spec.labels), latents.shape[1]))
    for code in np.unique(codes[codes > 0]):
        scores[code] = np.abs(latents[codes == code].mean(0) - control)
    return scores, False, list(run.spec.labels)


def recovery_metrics(run, data, seed: int = 0, latents: np.ndarray | None = None) -> dict:
    """``{split: {mcc_pearson, mcc_spearman, linear_r2[, target_*]}}`` (see module doc)."""
    z_true = np.asarray(data.adata.obsm["z_true"], dtype=float)
    if latents is None:
        latents = run.latents(data)["X_latent"]
    gt = data.adata.uns["ground_truth"]
    rng = np.random.default_rng(seed)
    out: dict = {}
    match = None
    for split in SPLITS:
        idx = data.indices(split)
        if len(idx) < 3:
            continue
        if len(idx) > MAX_CELLS:
            idx = np.sort(rng.choice(idx, MAX_CELLS, replace=False))
        entry = {}
        for method in ("pearson", "spearman"):
            m, corr = match_latents(z_true[idx], latents[idx], method=method)
            entry[f"mcc_{method}"] = float(corr.mean())
            if split == "train" and method == "pearson":
                match = m
        entry["linear_r2"] = linear_r2(z_true[idx], latents[idx])
        out[split] = entry
    if match is None:  # no training cells: match on all cells
        match, _ = match_latents(z_true, latents)

    # target identification over the perturbations seen in training
    scores, is_mask, names = inferred_targets(run, latents, data)
    row_of = {name: i for i, name in enumerate(names)}
    train_labels = set(data.labels[data.indices("train")].tolist())
    train_names = {run.spec.labels[c] for c in train_labels if c >= 0}
    truth_rows, pred_rows = [], []
    for i, pert in enumerate(list(gt["perturbations"])):
        if pert in row_of and pert in train_names:
            truth_rows.append(np.asarray(gt["targets"])[i])
            pred_rows.append(scores[row_of[pert]])
    if truth_rows:
        t = target_identification(np.asarray(truth_rows), np.asarray(pred_rows), match, scores=not is_mask)
        for split in ("train", "val"):
            if split in out:
                out[split].update(
                    target_precision=t["precision"], target_recall=t["recall"], target_f1=t["f1"]
                )
    return out


def recovery_evaluator(run, data, results, out_dir, seed, options: dict | None = None) -> None:
    """Adds the recovery metrics to ``results`` when the data has ground truth, and the
    block metrics (:mod:`.blocks`) when data and run both have background and salient
    blocks."""
    if not has_ground_truth(data):
        return
    latents = run.latents(data)
    for split, entry in recovery_metrics(run, data, seed=seed, latents=latents["X_latent"]).items():
        results.setdefault(split, {}).update(entry)
    for split, entry in block_recovery_metrics(latents, data, seed=seed).items():
        results.setdefault(split, {}).update(entry)
