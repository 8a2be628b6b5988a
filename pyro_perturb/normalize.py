"""Library-size normalisation shared by the data layer, the likelihoods and the evaluation.

Expression is compared on one scale everywhere: each cell is normalised to
:data:`LIBRARY` counts and log-transformed. Evaluation (ATEs, group means, posterior
predictive checks, the simulators' true ATE) uses ``log2(1 + LIBRARY * x / sum_g x)``
(:func:`lognormalize`); the Gaussian likelihood models the natural-log variant at the
cell's recorded library size, ``log1p(LIBRARY * x / l)`` (:func:`log1p_normalize`).

No imports from the rest of the package, so that any module can use it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["LIBRARY", "lognormalize", "log1p_normalize"]

#: library size to which every cell is normalised (and at which the model ATE draws counts)
LIBRARY = 1e4


def lognormalize(counts: torch.Tensor | np.ndarray, scale: float = LIBRARY):
    """``log2(1 + scale * x / sum_g x)`` per cell (last axis = genes).

    ``counts``: ``(..., G)`` numpy array or tensor; returns the same type and shape. A
    cell with no counts is divided by 1 (it stays all zeros)."""
    if isinstance(counts, np.ndarray):
        total = np.maximum(counts.sum(-1, keepdims=True), 1.0)
        return np.log2(1.0 + counts / total * scale)
    total = counts.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.log2(1.0 + counts / total * scale)


def log1p_normalize(counts: torch.Tensor, library: torch.Tensor, scale: float = LIBRARY) -> torch.Tensor:
    """``log1p(scale * x / l)``: counts ``(..., B, G)`` at the library sizes ``l`` ``(B,)``."""
    return torch.log1p(scale * counts / library.unsqueeze(-1))
