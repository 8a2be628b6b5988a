"""Library-size normalisation shared by the data layer, the likelihoods and the evaluation.

Expression is compared on one scale everywhere: each cell is normalised to
:data:`LIBRARY` counts and log-transformed. Evaluation (ATEs, group means, posterior
predictive checks, the simulators' true ATE) uses ``log2(1 + LIBRARY * x / sum_g x)``
(:func:`lognormalize`); the Gaussian likelihood models the natural-log variant at the
cell's recorded library size, ``log1p(LIBRARY * x / l)`` (:func:`log1p_normalize`). The
second effect statistic of the evaluation, the pseudobulk log fold change, compares mean
normalised expression (counts per :data:`LIBRARY`, :func:`normalize_total`) of two groups
of cells (:func:`pseudobulk_lfc`).

No imports from the rest of the package, so that any module can use it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["LIBRARY", "lognormalize", "log1p_normalize", "normalize_total", "pseudobulk_lfc"]

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


def normalize_total(counts: np.ndarray, scale: float = LIBRARY) -> np.ndarray:
    """``scale * x / sum_g x`` per cell (counts per ``scale``; last axis = genes).

    ``counts``: ``(..., G)`` numpy array; a cell with no counts stays all zeros."""
    total = np.maximum(counts.sum(-1, keepdims=True), 1.0)
    return counts / total * scale


def pseudobulk_lfc(mean_treated, mean_control, pseudocount: float = 1.0):
    """Pseudobulk log fold change ``log2(m_t + c) - log2(m_control + c)``.

    ``mean_treated``: ``(..., G)`` mean normalised expression (counts per 1e4,
    :func:`normalize_total`) of the treated cells (data) or the model's expected
    normalised expression; ``mean_control``: ``(G,)`` (or broadcastable) the same of the
    control; ``pseudocount``: ``c``, in counts per 1e4 (default 1). Works on numpy arrays
    and pandas objects alike."""
    return np.log2(mean_treated + pseudocount) - np.log2(mean_control + pseudocount)
