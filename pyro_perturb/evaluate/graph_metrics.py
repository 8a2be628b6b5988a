"""Edge-recovery metrics of a learned gene graph against the true one.

Every function takes ``(G, G)`` matrices whose entry ``[i, j]`` is the edge gene i -> gene j;
the diagonal is ignored (no self loops). The true graph is binary; a learned graph is
either binary (called edges) or a score per edge (for :func:`edge_auprc`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _square(matrix: Any, name: str) -> np.ndarray:
    arr = np.asarray(matrix, dtype=float)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be a square (G, G) matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has {int((~np.isfinite(arr)).sum())} non-finite entries")
    return arr


def _pair(true: Any, pred: Any, pred_name: str = "pred") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary truth, prediction and the off-diagonal mask, shapes checked."""
    t = _square(true, "true") != 0
    p = _square(pred, pred_name)
    if t.shape != p.shape:
        raise ValueError(f"true graph has shape {t.shape} but {pred_name} has shape {p.shape}")
    off = ~np.eye(t.shape[0], dtype=bool)
    return t, p, off


def structural_hamming_distance(true: Any, pred: Any) -> int:
    """SHD: edge additions, deletions and reversals that turn ``pred`` into ``true``; a
    reversed edge counts once (the convention of the DCD-FG and NODAGS-Flow papers), and
    so does a two-cycle predicted where one direction is true."""
    t, p, off = _pair(true, pred)
    p = (p != 0) & off
    t = t & off
    diff = t != p
    # pairs {i, j} where both directions disagree are one reversal, not two errors
    both = diff & diff.T
    reversals = np.triu(both & ((t & ~t.T) | (t.T & ~t) | (p & ~p.T) | (p.T & ~p)), 1)
    return int(diff.sum() - reversals.sum())


def edge_precision_recall_f1(true: Any, pred: Any) -> dict[str, float]:
    """Directed-edge precision, recall and F1 of the binary ``pred`` (``nan`` precision
    when it calls no edge, ``nan`` recall when the truth has none; F1 0 then)."""
    t, p, off = _pair(true, pred)
    p = (p != 0) & off
    t = t & off
    tp = float((t & p).sum())
    precision = tp / p.sum() if p.sum() else float("nan")
    recall = tp / t.sum() if t.sum() else float("nan")
    f1 = 2 * tp / (p.sum() + t.sum()) if (p.sum() + t.sum()) else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "n_edges_pred": int(p.sum()), "n_edges_true": int(t.sum())}


def edge_auprc(true: Any, scores: Any) -> float:
    """Area under the precision-recall curve of directed edges ranked by ``scores``
    (average precision: sum over recall steps of precision; tied scores enter together).
    Chance level is the edge density; ``nan`` when the truth has no edge."""
    t, s, off = _pair(true, scores, "scores")
    labels = t[off]
    values = s[off]
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-values, kind="stable")
    labels, values = labels[order], values[order]
    # the last index of each group of tied scores is where precision/recall are read
    ends = np.r_[np.nonzero(np.diff(values))[0], len(values) - 1]
    tp = np.cumsum(labels)[ends]
    called = ends + 1
    precision = tp / called
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float((precision * recall_step).sum())


def graph_metrics(true: Any, scores: Any, threshold: float) -> dict[str, float]:
    """SHD, precision, recall, F1 of ``scores > threshold`` and AUPRC of ``scores``."""
    s = _square(scores, "scores")
    called = np.abs(s) > threshold
    return {
        "shd": structural_hamming_distance(true, called),
        **edge_precision_recall_f1(true, called),
        "auprc": edge_auprc(true, np.abs(s)),
        "edge_density": float(np.mean(_square(true, "true")[~np.eye(s.shape[0], dtype=bool)] != 0)),
    }


__all__ = ["edge_auprc", "edge_precision_recall_f1", "graph_metrics", "regression_baseline_scores", "structural_hamming_distance"]


def regression_baseline_scores(y: Any, targeted: Any, ridge: float = 1.0) -> np.ndarray:
    """Edge scores of a regression baseline: ``[i, j] = |beta_ij|``, the ridge coefficient of
    gene i when gene j is regressed on all other genes (standardised expression), ranked
    as edge scores i -> j (e.g. for :func:`edge_auprc`).

    Each gene's regression uses the cells where that gene is not targeted (a perfect
    intervention cuts it from its parents), solved exactly per gene up to 500 genes; above
    that, one ridge precision matrix over every cell gives all regressions at once
    (``beta_ij = -P_ij / P_jj``, P the inverse of the regularised covariance).

    Args:
        y: ``(n_cells, G)`` expression (e.g. ``log1p(1e4 x / l)``).
        targeted: ``(n_cells, G)`` bool, the genes each cell's perturbations target.
        ridge: L2 penalty, relative to the number of cells used.

    Returns:
        ``(G, G)`` float scores, zero diagonal.
    """
    y = np.asarray(y, dtype=float)
    targeted = np.asarray(targeted, dtype=bool)
    if y.ndim != 2 or targeted.shape != y.shape:
        raise ValueError(f"y and targeted must both be (n_cells, G), got {y.shape} and {targeted.shape}")
    n, g = y.shape
    z = (y - y.mean(0)) / np.maximum(y.std(0), 1e-8)
    scores = np.zeros((g, g))
    if g <= 500:
        for j in range(g):
            rows = ~targeted[:, j]
            others = np.delete(np.arange(g), j)
            x = z[rows][:, others]
            gram = x.T @ x + ridge * rows.sum() * np.eye(g - 1) / max(n, 1)
            beta = np.linalg.solve(gram, x.T @ z[rows, j])
            scores[others, j] = np.abs(beta)
    else:
        precision = np.linalg.inv(z.T @ z / n + ridge / n * np.eye(g))
        scores = np.abs(-precision / np.diag(precision)[None, :])
    np.fill_diagonal(scores, 0.0)
    return scores
