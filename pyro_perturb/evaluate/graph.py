"""Gene graphs: the learned graph as tables, its edges against the truth, and the
interventional log-likelihood beside a no-edge baseline (docs/evaluation.md, "Gene graphs").

A gene-graph model (DCD-FG, NODAGS-Flow; :func:`pyro_perturb.contract.adjacency`) scores
``y = log1p(1e4 x / l)`` of the genes a cell's perturbations do not target (perfect
interventions) and has no per-cell latent, so a cell's IWELBO is its interventional
log-likelihood, and the **I-NLL** of a set of cells is the mean of ``-IWELBO`` over them
(nats per cell, summed over the cell's non-targeted genes).

The **no-edge baseline** is the graph without any edge: independent Gaussians per gene
on ``y``, with mean and standard deviation fitted on the training cells where that gene
is not targeted, scored over the non-targeted genes of each evaluated cell
(:func:`no_edge_nll`); same cells, same genes, same units as the model's I-NLL.

Which edges a learned graph calls (:func:`called_edges`): ``weight > 0.5`` for edge
probabilities; for magnitudes (e.g. ``|W|`` of a linear SEM, whose scale is the model's),
the ``k`` largest ``|weight|``, ``k`` the number of true edges (an oracle choice of the
density, reported as ``"top-k (k = true edges)"``; without a truth, every non-zero edge).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .. import contract
from ..contract import Adjacency
from ..data import PerturbationData
from ..data.simulate_graph import TRUE_ADJACENCY
from ..data.targets import target_matrix
from .graph_metrics import edge_auprc, edge_precision_recall_f1, regression_baseline_scores, structural_hamming_distance

#: the threshold of edge probabilities (an edge is called when its probability exceeds it)
PROBABILITY_THRESHOLD = 0.5
#: floor of the no-edge baseline's standard deviation (``y`` units): a gene constant on
#: the training cells would otherwise give an infinite density
MIN_SD = 1e-2
#: cells read at a time when streaming ``y``
_CHUNK = 4096
#: file beside ``metrics.json``: I-NLL of the model and the baseline per test label
PER_LABEL_CSV = "graph_inll_per_label.csv"
#: file beside ``metrics.json``: the called edges, strongest first
EDGES_CSV = "graph_edges.csv"
#: training cells the regression baseline of the edges is fitted on (a seeded subsample above)
REGRESSION_BASELINE_CELLS = 20_000


# --------------------------------------------------------------------------- the graph as tables


def check_threshold(adjacency: Adjacency, threshold: float | None) -> None:
    """A threshold on ``|weight|``: a finite number >= 0, and <= 1 for probabilities."""
    if threshold is None:
        return
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if adjacency.is_probability and value > 1:
        raise ValueError(f"the graph's weights are edge probabilities: threshold must be in [0, 1], got {threshold!r}")


def default_threshold(adjacency: Adjacency) -> float:
    """0.5 for edge probabilities, 0 (every non-zero edge) for magnitudes."""
    return PROBABILITY_THRESHOLD if adjacency.is_probability else 0.0


def adjacency_frame(adjacency: Adjacency, threshold: float | None = None) -> pd.DataFrame:
    """Genes x genes DataFrame of the weights (rows: source gene, columns: target gene),
    entries with ``|weight| <= threshold`` set to 0 (``threshold`` None: all kept)."""
    check_threshold(adjacency, threshold)
    weights = np.array(adjacency.weights, dtype=float)
    if threshold is not None:
        weights[np.abs(weights) <= float(threshold)] = 0.0
    genes = pd.Index(adjacency.genes)
    return pd.DataFrame(weights, index=genes.rename("source"), columns=genes.rename("target"))


def edge_list(adjacency: Adjacency, threshold: float | None = None, top: int | None = None) -> pd.DataFrame:
    """The edges with ``|weight| > threshold`` (default :func:`default_threshold`), as
    columns ``source``, ``target``, ``weight``, strongest ``|weight|`` first (ties by
    source then target), the first ``top`` when given; the diagonal is left out."""
    check_threshold(adjacency, threshold)
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1):
        raise ValueError(f"top must be a positive integer, got {top!r}")
    cut = default_threshold(adjacency) if threshold is None else float(threshold)
    weights = np.asarray(adjacency.weights, dtype=float)
    keep = np.abs(weights) > cut
    np.fill_diagonal(keep, False)
    src, dst = np.nonzero(keep)
    values = weights[src, dst]
    order = np.lexsort((dst, src, -np.abs(values)))
    if top is not None:
        order = order[: int(top)]
    genes = np.asarray(adjacency.genes, dtype=object)
    return pd.DataFrame({"source": genes[src[order]], "target": genes[dst[order]], "weight": values[order]})


def called_edges(adjacency: Adjacency, n_true_edges: int | None = None) -> tuple[np.ndarray, str]:
    """``(G, G)`` bool matrix of the edges a learned graph calls, and the rule used (the
    module docstring): ``weight > 0.5`` for probabilities; for magnitudes the
    ``n_true_edges`` largest ``|weight|`` (ties at the cut included), or every non-zero
    edge without a truth."""
    weights = np.abs(np.asarray(adjacency.weights, dtype=float))
    off = ~np.eye(weights.shape[0], dtype=bool)
    if adjacency.is_probability:
        return (weights > PROBABILITY_THRESHOLD) & off, f"probability > {PROBABILITY_THRESHOLD:g}"
    if n_true_edges is None:
        return (weights > 0) & off, "weight != 0"
    if n_true_edges == 0:
        return np.zeros_like(off), "top-k (k = true edges = 0)"
    values = np.sort(weights[off])[::-1]
    cut = values[min(n_true_edges, len(values)) - 1]
    return (weights >= cut) & (weights > 0) & off, f"top-k (k = true edges = {n_true_edges})"


def true_adjacency(data: PerturbationData, genes: list[str]) -> np.ndarray | None:
    """The simulator's true graph (``varp["true_adjacency"]``) over ``genes`` in that
    order, or None when the data has none."""
    adata = data.adata
    varp = getattr(adata, "varp", None)
    if varp is None or TRUE_ADJACENCY not in varp.keys():
        return None
    truth = np.asarray(varp[TRUE_ADJACENCY].toarray() if hasattr(varp[TRUE_ADJACENCY], "toarray") else varp[TRUE_ADJACENCY])
    frame = pd.DataFrame(truth, index=[str(g) for g in adata.var_names], columns=[str(g) for g in adata.var_names])
    missing = [g for g in genes if g not in frame.index]
    if missing:
        raise ValueError(f"varp[{TRUE_ADJACENCY!r}] lacks genes of the learned graph: {missing[:5]}")
    return frame.loc[genes, genes].to_numpy(dtype=float)


def edge_metrics(truth: np.ndarray, adjacency: Adjacency) -> dict:
    """SHD, precision, recall, F1 of :func:`called_edges`, AUPRC of ``|weight|`` and the
    edge density (the AUPRC of a random ranking), against the binary ``truth != 0``."""
    true = np.asarray(truth) != 0
    off = ~np.eye(true.shape[0], dtype=bool)
    n_true = int((true & off).sum())
    called, rule = called_edges(adjacency, n_true)
    scores = np.abs(np.asarray(adjacency.weights, dtype=float))
    return {
        "threshold_rule": rule,
        "shd": structural_hamming_distance(true, called),
        **edge_precision_recall_f1(true, called),
        "auprc": edge_auprc(true, scores),
        "edge_density": float(true[off].mean()) if off.any() else float("nan"),
        "n_genes": int(true.shape[0]),
        "is_probability": bool(adjacency.is_probability),
    }


# --------------------------------------------------------------------------- the no-edge baseline


def fit_no_edge(train_y: np.ndarray, train_targeted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation ``(G,)`` of ``y`` over the training cells
    where the gene is not targeted (maximum likelihood; sd floored at :data:`MIN_SD`).

    Args:
        train_y: ``(n, G)`` ``log1p(1e4 x / l)`` of the training cells.
        train_targeted: ``(n, G)`` bool, the genes each cell's perturbations target.
    """
    y, targeted = _check_pair(train_y, train_targeted, "train")
    free = ~targeted
    n = free.sum(0)
    if (n == 0).any():
        raise ValueError(f"genes targeted in every training cell (no cell to fit them on): columns {np.flatnonzero(n == 0)[:5].tolist()}")
    total = np.where(free, y, 0.0).sum(0)
    total_sq = np.where(free, y * y, 0.0).sum(0)
    return _moments(total, total_sq, n)


def _moments(total: np.ndarray, total_sq: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = total / n
    sd = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    return mean, np.maximum(sd, MIN_SD)


def score_no_edge(mean: np.ndarray, sd: np.ndarray, y: np.ndarray, targeted: np.ndarray) -> np.ndarray:
    """``-log p`` per cell ``(n,)``: the sum over the cell's non-targeted genes of the
    Gaussian ``N(mean_g, sd_g^2)`` negative log-density of ``y``."""
    y, targeted = _check_pair(y, targeted, "test")
    if y.shape[1] != len(mean):
        raise ValueError(f"y has {y.shape[1]} genes but the baseline was fitted on {len(mean)}")
    z = (y - mean) / sd
    nll = 0.5 * z**2 + np.log(sd) + 0.5 * math.log(2 * math.pi)
    return np.where(targeted, 0.0, nll).sum(1)


def no_edge_nll(train_y: np.ndarray, train_targeted: np.ndarray, test_y: np.ndarray, test_targeted: np.ndarray) -> np.ndarray:
    """The no-edge baseline's ``-log p`` per test cell ``(n_test,)`` (module docstring):
    :func:`fit_no_edge` on the training cells, :func:`score_no_edge` on the test cells.
    All four arrays have G columns; ``*_targeted`` are bool."""
    mean, sd = fit_no_edge(train_y, train_targeted)
    return score_no_edge(mean, sd, test_y, test_targeted)


def _check_pair(y, targeted, name: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    targeted = np.asarray(targeted, dtype=bool)
    if y.ndim != 2 or y.shape != targeted.shape:
        raise ValueError(f"{name}_y {y.shape} and {name}_targeted {targeted.shape} must be (n_cells, G) of one shape")
    if not np.isfinite(y).all():
        raise ValueError(f"{name}_y has non-finite values")
    return y, targeted


def expression_chunks(data: PerturbationData, idx: np.ndarray, unmatched: str = "ignore") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(y, targeted)`` of the cells ``idx``, :data:`_CHUNK` cells at a time: ``y =
    log1p(1e4 x / l)`` ``(n, G)`` (``l`` the observed library) and the targeted genes
    (:func:`~pyro_perturb.data.targets.target_matrix`)."""
    targets = target_matrix(data.spec, unmatched).numpy() > 0
    for start in range(0, len(idx), _CHUNK):
        sub = np.asarray(idx[start : start + _CHUNK])
        x = data.read_counts(sub).astype(np.float64)
        y = np.log1p(1e4 * x / data.library[sub, None])
        dose = np.abs(np.asarray(data.dosage[sub].todense())) > 0
        yield y, (dose.astype(np.float64) @ targets) > 0


def no_edge_baseline(data: PerturbationData, eval_idx: np.ndarray, train_split: str = "train") -> np.ndarray:
    """:func:`no_edge_nll` on ``data``, streamed: fitted on the cells of ``train_split``,
    scored on the cells ``eval_idx`` -> ``(len(eval_idx),)``."""
    n_genes = data.spec.n_genes
    total, total_sq, n = np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes)
    for y, targeted in expression_chunks(data, data.indices(train_split)):
        free = ~targeted
        total += np.where(free, y, 0.0).sum(0)
        total_sq += np.where(free, y * y, 0.0).sum(0)
        n += free.sum(0)
    if (n == 0).any():
        raise ValueError(f"no {train_split} cell leaves genes {[data.spec.genes[g] for g in np.flatnonzero(n == 0)[:5]]} untargeted")
    mean, sd = _moments(total, total_sq, n)
    parts = [score_no_edge(mean, sd, y, targeted) for y, targeted in expression_chunks(data, np.asarray(eval_idx))]
    return np.concatenate(parts) if parts else np.zeros(0)


def regression_baseline_metrics(data: PerturbationData, truth: np.ndarray, genes: list[str], seed: int = 0) -> dict:
    """:func:`edge_metrics` of the ridge-regression baseline of the edges
    (:func:`~pyro_perturb.evaluate.graph_metrics.regression_baseline_scores`: gene i's
    coefficient when gene j is regressed on the others, as the score of i -> j) fitted on
    up to :data:`REGRESSION_BASELINE_CELLS` training cells; called by the top-k rule."""
    idx = data.indices("train")
    if len(idx) > REGRESSION_BASELINE_CELLS:
        idx = np.sort(np.random.default_rng(seed).choice(idx, REGRESSION_BASELINE_CELLS, replace=False))
    parts = list(expression_chunks(data, idx))
    y = np.concatenate([p[0] for p in parts])
    targeted = np.concatenate([p[1] for p in parts])
    scores = regression_baseline_scores(y, targeted)
    order = [data.spec.genes.index(g) for g in genes]
    return edge_metrics(truth, Adjacency(scores[np.ix_(order, order)], False, list(genes)))


# --------------------------------------------------------------------------- the evaluator


def inll_per_label(data: PerturbationData, idx: np.ndarray, model_nll: np.ndarray, baseline_nll: np.ndarray) -> pd.DataFrame:
    """One row per perturbation label of the cells ``idx``: ``n_cells``,
    ``n_train_cells`` (0: a held-out intervention), ``inll_model`` and
    ``inll_no_edge`` (mean ``-log p`` per cell) and ``delta`` (model minus baseline:
    negative when the graph helps)."""
    labels = data.label_names(idx)
    train_labels = pd.Series(data.label_names(data.indices("train"))).value_counts()
    frame = pd.DataFrame({"perturbation": labels, "model": model_nll, "no_edge": baseline_nll})
    grouped = frame.groupby("perturbation", sort=True)
    table = pd.DataFrame({
        "n_cells": grouped.size(),
        "inll_model": grouped["model"].mean(),
        "inll_no_edge": grouped["no_edge"].mean(),
    })
    table.insert(1, "n_train_cells", [int(train_labels.get(lab, 0)) for lab in table.index])
    table["delta"] = table["inll_model"] - table["inll_no_edge"]
    return table.reset_index()


def _summary(model_nll: np.ndarray, baseline_nll: np.ndarray) -> dict:
    n = len(model_nll)
    se = (lambda v: float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else 0.0)
    return {
        "n_cells": int(n),
        "inll_model": float(np.mean(model_nll)) if n else float("nan"),
        "inll_no_edge": float(np.mean(baseline_nll)) if n else float("nan"),
        "delta": float(np.mean(model_nll - baseline_nll)) if n else float("nan"),
        "delta_se": se(model_nll - baseline_nll),
    }


def graph_evaluator(run, data: PerturbationData, results: dict, out_dir: Path | None, seed: int, options: dict | None = None) -> None:
    """``evaluate`` hook of the gene-graph models (a model with ``adjacency()``).

    Adds ``results["graph"]``: ``"edges"`` (:func:`edge_metrics` against
    ``varp["true_adjacency"]``, when the data has it) beside
    ``"edges_regression_baseline"`` (:func:`regression_baseline_metrics`), ``"inll"`` (per split:
    :func:`_summary` of the model's ``-IWELBO`` beside the no-edge baseline on the same
    cells), ``"inll_heldout"`` (the test cells whose label has no training cell, the
    control excluded: held-out interventions) and ``"per_label"`` (the test split's
    :func:`inll_per_label`). Writes ``graph_inll_per_label.csv`` and
    ``graph_edges.csv`` beside ``metrics.json``. Reads the per-cell IWELBO that
    :func:`~pyro_perturb.evaluate.evaluate_run` computed (``options["iwelbo_per_cell"]``);
    splits without it are computed here.
    """
    adjacency = contract.adjacency(run.model)
    if adjacency is None:
        return
    opts = dict(options or {})
    per_cell = dict(opts.get("iwelbo_per_cell") or {})
    block: dict = {}
    truth = true_adjacency(data, adjacency.genes)
    if truth is not None:
        block["edges"] = edge_metrics(truth, adjacency)
        if len(data.indices("train")) > 1:
            block["edges_regression_baseline"] = regression_baseline_metrics(data, truth, adjacency.genes, seed)
    n_true = None if truth is None else int(((truth != 0) & ~np.eye(len(truth), dtype=bool)).sum())
    called, rule = called_edges(adjacency, n_true)

    inll: dict = {}
    table = None
    for split in ("train", "val", "test"):
        idx = data.indices(split)
        if not len(idx):
            continue
        values = per_cell.get(split)
        if values is None:
            values = run.iwelbo(data, split=split, num_particles=int(results.get("num_particles", 100)), seed=seed)
        model_nll = -np.asarray(values, dtype=np.float64)
        baseline = no_edge_baseline(data, idx)
        inll[split] = _summary(model_nll, baseline)
        if split == "test":
            table = inll_per_label(data, idx, model_nll, baseline)
            labels = data.label_names(idx)
            held = table.loc[(table["n_train_cells"] == 0) & (table["perturbation"] != data.spec.control), "perturbation"]
            mask = np.isin(labels, held.to_numpy())
            if mask.any():
                block["inll_heldout"] = {**_summary(model_nll[mask], baseline[mask]), "labels": sorted(held.tolist())}
    block["inll"] = inll
    if table is not None:
        block["per_label"] = table.to_dict("records")
    block["n_edges_called"] = int(called.sum())
    block["edges_called_rule"] = rule
    results["graph"] = block

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if table is not None:
            table.to_csv(out_dir / PER_LABEL_CSV, index=False)
        edges = edge_list(Adjacency(np.where(called, adjacency.weights, 0.0), adjacency.is_probability, adjacency.genes),
                          threshold=0.0)
        if truth is not None:
            index = {g: i for i, g in enumerate(adjacency.genes)}
            edges["true_edge"] = [bool(truth[index[s], index[t]] != 0) for s, t in zip(edges["source"], edges["target"])]
        edges.to_csv(out_dir / EDGES_CSV, index=False)


__all__ = [
    "EDGES_CSV",
    "MIN_SD",
    "PER_LABEL_CSV",
    "PROBABILITY_THRESHOLD",
    "adjacency_frame",
    "called_edges",
    "check_threshold",
    "default_threshold",
    "edge_list",
    "edge_metrics",
    "expression_chunks",
    "fit_no_edge",
    "graph_evaluator",
    "inll_per_label",
    "no_edge_baseline",
    "no_edge_nll",
    "regression_baseline_metrics",
    "score_no_edge",
    "true_adjacency",
]
