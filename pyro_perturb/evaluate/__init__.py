"""Evaluation shared by every model: held-out IWELBO per split, plus the metric families
listed in :data:`EVALUATORS` (ATE by posterior predictive, group means, latent recovery).

:func:`evaluate_run` computes ``{"train": {...}, "val": {...}, "test": {...}}`` with at
least ``iwelbo`` (mean per cell, nats), ``iwelbo_se`` and ``n_cells`` for each split, then
calls every evaluator, which may add keys to the splits and write files beside
``metrics.json``. An evaluator returns at once when the data or the model lacks what it
needs (no dosage, no covariates, no ground truth).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..data import PerturbationData
from ..data.anndata import SPLITS
from ..infer.checkpoint import atomic_json
from ..infer.iwelbo import iwelbo
from .ate import ate_evaluator
from .graph import graph_evaluator
from .groups import group_evaluator
from .recovery import recovery_evaluator

# evaluator(run, data, results, out_dir, seed, options): adds to ``results`` in place;
# ``options`` is a dict of evaluator settings (e.g. ``ate_particles``), possibly empty
Evaluator = Callable[..., None]

#: the metric families :func:`evaluate_run` calls, in this order: ATE by posterior
#: predictive (models with a dosage), group means (data with covariates), latent recovery
#: (data with a simulator's ground truth), gene graphs (models with ``adjacency()``:
#: edges against a true graph, interventional NLL beside the no-edge baseline)
EVALUATORS: tuple[Evaluator, ...] = (ate_evaluator, group_evaluator, recovery_evaluator, graph_evaluator)


def evaluate_run(
    run,
    data: PerturbationData,
    num_particles: int = 100,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    splits: tuple[str, ...] = SPLITS,
    options: dict | None = None,
) -> dict:
    """Held-out IWELBO per split and the metrics of :data:`EVALUATORS`; JSON-ready dict.

    ``options`` go to the evaluators: ``ate_particles`` (model ATE particles,
    default 250, integrated), ``ate_library`` (``"observed"``, default, or a number: the depth of the
    model's drawn cells), ``ate_ppc`` / ``ate_plots`` (bools), ``ppc_draws``,
    ``ate_data_cells``, ``ate_memory_mb`` (the model ATE's working-memory budget).
    The evaluators also receive ``options["iwelbo_per_cell"]``, ``{split: (n,) array}``
    of the per-cell IWELBO computed here (the gene-graph evaluator's I-NLL per label).
    """
    results: dict = {}
    per_cell: dict = {}
    for split in splits:
        idx = data.indices(split)
        entry: dict = {"n_cells": int(len(idx))}
        if len(idx):
            values = iwelbo(run.model, run.guide, data, split, num_particles, seed=seed, device=run.device)
            per_cell[split] = values
            entry["iwelbo"] = float(values.mean())
            entry["iwelbo_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        else:
            entry["iwelbo"] = None
        results[split] = entry
    results["model"] = run.name
    results["num_particles"] = num_particles
    out = Path(out_dir) if out_dir is not None else None
    for evaluator in EVALUATORS:
        evaluator(run, data, results, out, seed, {**dict(options or {}), "iwelbo_per_cell": per_cell})
    return results


def write_metrics(results: dict, path: str | os.PathLike) -> None:
    """Write ``metrics.json`` atomically (NaN becomes null)."""
    atomic_json(_jsonable(results), Path(path))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


__all__ = ["EVALUATORS", "evaluate_run", "write_metrics"]
