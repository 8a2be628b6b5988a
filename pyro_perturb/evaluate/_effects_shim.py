"""Temporary stand-in for ``predictive.model_effects`` (the model-effects API), so that
the evaluation can call it before it lands; :mod:`.ate` imports ``model_effects`` from
here through one line, to be pointed at :mod:`.predictive` when it does.

Same signature and return type. Crude on purpose: the ATE is :func:`.predictive.model_ate`
at one library size (a number as given; for per-row pools of observed library sizes, the
median of all pools), and the absolute means (``lognorm_mean``, ``normalized_mean``) are
plain posterior predictive draws of ``min(num_particles, 256)`` cells per row at library
sizes resampled from the row's pool (:func:`.groups._predict`), not integrated.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..normalize import LIBRARY
from .groups import _predict
from .predictive import DEFAULT_PARTICLES, model_ate

__all__ = ["EffectPrediction", "model_effects"]

_MAX_DRAWS = 256  # cells drawn per row for the absolute means


@dataclass
class EffectPrediction:
    """A model's predicted effects (see the model-effects API).

    Attributes:
        ate: labels x genes: mean log2(1 + 1e4 x / T) of the label minus the control's.
        lognorm_mean: rows [control] + labels, x genes: the absolute mean of that statistic.
        normalized_mean: rows [control] + labels, x genes: mean of 1e4 x / T (counts per
            1e4), for the pseudobulk log fold change.
        library: the depth the cells were drawn at, in words.
        estimator: ``"integrated"`` or ``"sampled"``.
        num_particles: particles per row.
    """

    ate: pd.DataFrame
    lognorm_mean: pd.DataFrame
    normalized_mean: pd.DataFrame
    library: str
    estimator: str
    num_particles: int


def model_effects(
    model,
    guide,
    spec,
    labels: list[str],
    *,
    library=LIBRARY,
    num_particles: int = DEFAULT_PARTICLES,
    seed: int = 0,
    estimator: str = "integrated",
    device=None,
    memory_mb: float | None = None,
    covariates=None,
) -> EffectPrediction:
    """Stand-in for ``predictive.model_effects`` (see the module docstring).

    ``library``: a number, or ``{row: 1-D array of observed library sizes}`` holding every
    requested row including the control (a missing row raises ValueError naming it).
    ``covariates`` is ignored (the first category of each covariate, as ``model_ate``).
    """
    labels = list(labels)
    control = spec.control
    rows = [control] + list(dict.fromkeys(lab for lab in labels if lab != control))
    if isinstance(library, Mapping):
        missing = [row for row in rows if row not in library or len(np.atleast_1d(library[row])) == 0]
        if missing:
            raise ValueError(f"library has no pool of library sizes for rows {missing}")
        pools = {row: np.atleast_1d(np.asarray(library[row], dtype=np.float64)) for row in rows}
        depth = float(np.median(np.concatenate(list(pools.values()))))
        described = f"observed (pools: median {depth:.0f} over the rows' compared cells; shim: ATE at the median)"
    else:
        depth = float(library)
        pools = {row: np.array([depth]) for row in rows}
        described = f"fixed {depth:g}"
    if device is None:
        device = next(iter(model.parameters()), None)
        device = "cpu" if device is None else device.device
    ate = model_ate(model, guide, spec, labels, num_particles=num_particles, seed=seed, device=device,
                    library=depth, memory_mb=memory_mb)
    n_draws = max(1, min(int(num_particles), _MAX_DRAWS))
    lognorm, normalized = [], []
    for row in rows:
        row_seed = (int(seed) * 1_000_003 + zlib.crc32(row.encode())) % 2**31
        lib = np.random.default_rng(row_seed).choice(pools[row], size=n_draws, replace=True)
        # batches of 32 cells: each batch draws its own global latents from the guide
        draws = _predict(model, guide, spec, None, row, lib, row_seed, device, 32, mean=False)
        lognorm.append(draws.mean(0))
        normalized.append((np.exp2(draws) - 1.0).mean(0))  # 2^y - 1 = 1e4 x / T
    index = pd.Index(rows, name="perturbation")
    return EffectPrediction(
        ate=ate,
        lognorm_mean=pd.DataFrame(np.stack(lognorm), index=index, columns=spec.genes),
        normalized_mean=pd.DataFrame(np.stack(normalized), index=index, columns=spec.genes),
        library=described,
        estimator="sampled",
        num_particles=int(num_particles),
    )
