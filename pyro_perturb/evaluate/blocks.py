"""Block recovery and leakage of comparative models against a simulator's true blocks
(docs/evaluation.md, "Latent blocks").

For data with ``uns["ground_truth"]["blocks"]`` naming a ``"background"`` and a
``"salient"`` block of ``obsm["z_true"]`` (:func:`pyro_perturb.data.simulate.comparative`)
and a run whose ``posterior_latents`` has the blocks ``X_background`` and ``X_salient``
(the comparative models), per split:

* ``background_mcc``: MCC (:func:`~.metrics.mcc`, Pearson) of the learned background block
  against the true one, over all cells; ``salient_mcc``: the same for the salient blocks
  over the target (perturbed) cells, the only ones that have a salient state;
* ``background_r2`` / ``salient_r2``: block identifiability up to an invertible linear
  map: R^2 of the true block regressed linearly on the learned one (cross-validated);
* ``leakage_background``: how much of the true *salient* block the learned *background*
  block predicts on target cells; ``leakage_salient``: how much of the true *background*
  block the learned *salient* block predicts. Cross-validated kNN regression R^2
  (:func:`leakage_r2`), clipped at 0: 0 is no leakage, 1 a block that carries the other
  block entirely.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.neighbors import KNeighborsRegressor

from .. import contract
from ..data.anndata import SPLITS
from .metrics import mcc

#: cells per split used for the block metrics (a seeded subsample above this)
MAX_CELLS = 5_000


def _matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be a finite (n, d) array, got shape {arr.shape}")
    return arr


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def cross_validated_r2(source, target, regressor: str = "knn", n_neighbors: int = 15, n_folds: int = 5,
                       seed: int = 0) -> float:
    """R^2 (uniform average over the target's columns) of ``target`` (n, K) predicted from
    ``source`` (n, L) out of fold (``n_folds``-fold, shuffled with ``seed``), by kNN
    regression on standardised ``source`` (``regressor="knn"``) or least squares
    (``"linear"``). Can be negative (worse than the mean); needs ``n >= 2 * n_folds``."""
    src, tgt = _matrix(source, "source"), _matrix(target, "target")
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"source and target need the same rows, got {src.shape[0]} and {tgt.shape[0]}")
    if src.shape[0] < 2 * n_folds:
        raise ValueError(f"need at least {2 * n_folds} cells for {n_folds}-fold R^2, got {src.shape[0]}")
    if regressor == "knn":
        model = KNeighborsRegressor(n_neighbors=min(n_neighbors, src.shape[0] * (n_folds - 1) // n_folds))
    elif regressor == "linear":
        model = LinearRegression()
    else:
        raise ValueError(f"regressor must be 'knn' or 'linear', got {regressor!r}")
    pred = cross_val_predict(model, _standardise(src), tgt, cv=KFold(n_folds, shuffle=True, random_state=seed))
    keep = tgt.std(0) > 0
    if not keep.any():
        return 1.0
    return float(r2_score(tgt[:, keep], pred[:, keep], multioutput="uniform_average"))


def leakage_r2(learned_block, other_true_block, seed: int = 0) -> float:
    """How much of a true block a learned block of the *other* kind predicts: the
    cross-validated kNN R^2 (:func:`cross_validated_r2`) clipped to [0, 1]."""
    return float(np.clip(cross_validated_r2(learned_block, other_true_block, seed=seed), 0.0, 1.0))


def block_metrics(true_background, true_salient, background, salient, target, seed: int = 0) -> dict[str, float]:
    """The block metrics of the module docstring for one set of cells.

    Args:
        true_background, background: ``(n, Lb_true)``, ``(n, Lb)`` true and learned
            background blocks.
        true_salient, salient: ``(n, Ls_true)``, ``(n, Ls)``.
        target: ``(n,)`` bool, the target cells.
    """
    tb, ts = _matrix(true_background, "true_background"), _matrix(true_salient, "true_salient")
    lb, ls = _matrix(background, "background"), _matrix(salient, "salient")
    target = np.asarray(target, dtype=bool)
    out = {
        "background_mcc": mcc(tb, lb),
        "background_r2": cross_validated_r2(lb, tb, regressor="linear", seed=seed),
    }
    if target.sum() >= 10:
        t = target
        out.update(
            salient_mcc=mcc(ts[t], ls[t]),
            salient_r2=cross_validated_r2(ls[t], ts[t], regressor="linear", seed=seed),
            leakage_background=leakage_r2(lb[t], ts[t], seed=seed),
            leakage_salient=leakage_r2(ls[t], tb[t], seed=seed),
        )
    return out


def has_block_truth(data) -> bool:
    """The data carries a simulator's background and salient blocks."""
    adata = data.adata
    gt = adata.uns.get("ground_truth") if hasattr(adata, "uns") else None
    blocks = gt.get("blocks") if isinstance(gt, dict) else None
    return isinstance(blocks, dict) and {"background", "salient"} <= set(blocks) and "z_true" in adata.obsm


def block_recovery_metrics(latents: dict[str, np.ndarray], data, seed: int = 0) -> dict:
    """``{split: {background_mcc, ..., leakage_salient}}`` for a run's ``latents``
    (``Run.latents`` output) on ``data``; ``{}`` when either side lacks the two blocks."""
    learned = contract.latent_blocks(latents)
    if not has_block_truth(data) or not {"background", "salient"} <= set(learned):
        return {}
    gt_blocks = data.adata.uns["ground_truth"]["blocks"]
    z_true = np.asarray(data.adata.obsm["z_true"], dtype=float)
    tb = z_true[:, int(gt_blocks["background"][0]) : int(gt_blocks["background"][1])]
    ts = z_true[:, int(gt_blocks["salient"][0]) : int(gt_blocks["salient"][1])]
    target = np.asarray(data.labels) != 0
    rng = np.random.default_rng(seed)
    out = {}
    for split in SPLITS:
        idx = data.indices(split)
        if len(idx) < 20:
            continue
        if len(idx) > MAX_CELLS:
            idx = np.sort(rng.choice(idx, MAX_CELLS, replace=False))
        out[split] = block_metrics(tb[idx], ts[idx], learned["background"][idx], learned["salient"][idx],
                                   target[idx], seed=seed)
    return out


def group_separation(latent, groups, n_neighbors: int = 15, n_folds: int = 5, seed: int = 0,
                     max_cells: int = 5_000) -> dict[str, float]:
    """How well a latent space separates groups of cells (real data, no ground truth).

    Args:
        latent: ``(n, L)`` posterior means.
        groups: ``(n,)`` group names or codes (at least 2 groups).

    Returns:
        ``silhouette`` (sklearn, Euclidean, on standardised latents: -1..1, 0 = no
        structure), ``knn_balanced_accuracy`` (out-of-fold kNN classifier, balanced over
        groups; chance ``1 / n_groups``) and ``chance``. Seeded subsample above
        ``max_cells``.
    """
    from sklearn.metrics import balanced_accuracy_score, silhouette_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    x = _standardise(_matrix(latent, "latent"))
    g = np.asarray(groups)
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"groups has {g.shape[0]} entries for {x.shape[0]} cells")
    names, codes = np.unique(g, return_inverse=True)
    if len(names) < 2:
        raise ValueError(f"group_separation needs at least 2 groups, got {list(names)}")
    if x.shape[0] > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_cells, replace=False))
        x, codes = x[keep], codes[keep]
    folds = min(n_folds, int(np.bincount(codes).min()))
    pred = cross_val_predict(KNeighborsClassifier(n_neighbors=n_neighbors), x, codes,
                             cv=StratifiedKFold(max(folds, 2), shuffle=True, random_state=seed))
    return {
        "silhouette": float(silhouette_score(x, codes)),
        "knn_balanced_accuracy": float(balanced_accuracy_score(codes, pred)),
        "chance": 1.0 / len(names),
    }


__all__ = ["block_metrics", "block_recovery_metrics", "cross_validated_r2", "group_separation", "has_block_truth",
           "leakage_r2"]
