"""Evaluation shared by every model: held-out IWELBO per split, plus the metrics that
model families register (ATE by posterior predictive, latent recovery, group means).

:func:`evaluate_run` computes ``{"train": {...}, "val": {...}, "test": {...}}`` with at
least ``iwelbo`` (mean per cell, nats), ``iwelbo_se`` and ``n_cells`` for each split, then
calls every registered evaluator, which may add keys to the splits and write files
beside ``metrics.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..data import PerturbationData
from ..data.anndata import SPLITS
from ..infer.checkpoint import atomic_json
from ..infer.iwelbo import iwelbo

# evaluator(run, data, results, out_dir, seed, options): adds to ``results`` in place;
# ``options`` is a dict of evaluator settings (e.g. ``ate_particles``), possibly empty
Evaluator = Callable[..., None]
EVALUATORS: list[Evaluator] = []


def register_evaluator(fn: Evaluator) -> Evaluator:
    """Add a metric family to :func:`evaluate_run` (used as a decorator)."""
    if fn not in EVALUATORS:
        EVALUATORS.append(fn)
    return fn


def evaluate_run(
    run,
    data: PerturbationData,
    num_particles: int = 100,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    splits: tuple[str, ...] = SPLITS,
    options: dict | None = None,
) -> dict:
    """Held-out IWELBO per split and every registered metric; JSON-ready dict.

    ``options`` go to the registered evaluators: ``ate_particles`` (model ATE particles,
    default 2,500), ``ate_ppc`` / ``ate_plots`` (bools), ``ppc_draws``, ``ate_data_cells``,
    ``ate_memory_mb`` (the model ATE's working-memory budget).
    """
    results: dict = {}
    for split in splits:
        idx = data.indices(split)
        entry: dict = {"n_cells": int(len(idx))}
        if len(idx):
            values = iwelbo(run.model, run.guide, data, split, num_particles, seed=seed, device=run.device)
            entry["iwelbo"] = float(values.mean())
            entry["iwelbo_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        else:
            entry["iwelbo"] = None
        results[split] = entry
    results["model"] = run.name
    results["num_particles"] = num_particles
    out = Path(out_dir) if out_dir is not None else None
    for evaluator in EVALUATORS:
        evaluator(run, data, results, out, seed, dict(options or {}))
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


__all__ = ["EVALUATORS", "evaluate_run", "register_evaluator", "write_metrics"]

# ATE by posterior predictive, for every model with a dosage (pyro_perturb/evaluate/ate.py)
from .ate import ate_evaluator  # noqa: E402

register_evaluator(ate_evaluator)


from . import groups  # noqa: E402,F401  (registers the group-means evaluator)
from . import recovery  # noqa: E402,F401  (registers the latent-recovery evaluator)
