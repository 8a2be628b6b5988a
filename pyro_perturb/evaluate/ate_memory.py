"""Working-memory model of the model ATE: how many request rows and particles per step
fit a budget.

:func:`~pyro_perturb.evaluate.predictive.model_effects` runs in steps of ``particles``
particles x ``n_rows`` request rows; :func:`ate_working_memory` estimates the peak memory
of one step from the sizes of the data and of the networks (:func:`widest_layer`,
:func:`guide_hidden_width`), with factors fitted to measured peak RSS, and
:func:`ate_batch_for_memory` takes the largest step that fits a budget.
"""

from __future__ import annotations

import torch

from .. import contract

__all__ = [
    "DEFAULT_MEMORY_MB",
    "ate_working_memory",
    "ate_batch_for_memory",
    "widest_layer",
    "guide_hidden_width",
]


# Working memory of the model ATE, in bytes (ate_working_memory): a fixed part (the first
# Predictive calls' allocator arenas, thread buffers and caches) plus, per particle of a
# step, the globals (the guide's E and M with its per-treatment hidden layer for the
# correlated SAMS-VAE guide; the model's E * M), and per particle and request row,
# gene-sized buffers (decoder output, log-softmax, NB logits, counts) and latent/hidden
# ones; per thread, one row's draw. Factors in float32 buffers, fitted to peak RSS
# (VmHWM minus RSS before the call) with bench/ate_benchmark.py at 200 and 700 treatments
# (1,187 genes, latent 100, hidden 400), where they over-estimate by up to 20%.
_FIXED_MB = 210.0
_GENE_BUFFERS = 2.5
_HIDDEN_BUFFERS = 2.0
_GLOBAL_BUFFERS = 4.0
_GUIDE_HIDDEN_BUFFERS = 2.25
_ROW_DRAW_BUFFERS = 5.0
# the factors were fitted at 200 treatments; at 700 x 2,500 the estimate came out 2% under
# the measured working peak (bench/results/ate_benchmark.md, row F): headroom on the part
# that grows with the batch
_HEADROOM = 1.15
# Since then the count site is captured instead of sampled (predictive.CountSite), which
# saves one (particles, rows, genes) buffer of drawn counts, and each thread computes its
# row's statistic in (particles, genes) buffers (the integrated estimator adds ~6 MB of
# quadrature buffers per thread): the estimate stays an upper bound for both estimators
# (100 treatments x 200 particles, 2 threads, 1,187 genes: working peak 255-289 MB before,
# 229-271 MB sampled, 237-248 MB integrated over 3-4 runs each).
#: the model ATE's default working-memory budget (MB) when none is given
DEFAULT_MEMORY_MB = 1024.0


def ate_working_memory(
    n_rows: int,
    particles: int,
    n_genes: int,
    n_latent: int,
    n_treatments: int,
    n_threads: int = 1,
    hidden: int = 0,
    guide_hidden: int = 0,
) -> float:
    """Estimated peak working memory (bytes) of the model ATE run in steps of
    ``particles`` particles x ``n_rows`` request rows.

    ``hidden``: the model's widest hidden layer; ``guide_hidden``: the width of a guide
    network run once per treatment and particle (SAMS-VAE's correlated ``q(E | M)``)."""
    per_row = 4.0 * (_GENE_BUFFERS * n_genes + _HIDDEN_BUFFERS * (n_latent + hidden))
    per_particle = 4.0 * n_treatments * (_GLOBAL_BUFFERS * n_latent + _GUIDE_HIDDEN_BUFFERS * guide_hidden)
    per_particle += 4.0 * _ROW_DRAW_BUFFERS * n_genes * n_threads
    return _FIXED_MB * 2**20 + _HEADROOM * float(particles) * (n_rows * per_row + per_particle)


def ate_batch_for_memory(
    memory_mb: float,
    n_rows: int,
    particles: int,
    n_genes: int,
    n_latent: int,
    n_treatments: int,
    n_threads: int = 1,
    hidden: int = 0,
    guide_hidden: int = 0,
) -> tuple[int, int]:
    """``(treatment_rows, particles)`` per step whose working memory fits ``memory_mb``.

    The particle count is kept if one row of it fits (results then do not change) and
    the largest number of request rows, at most ``n_rows``, that fits is taken;
    otherwise the most particles for which one row fits, and as many rows as fit with
    them. Raises ValueError naming the minimum budget if one row of one particle does
    not fit.
    """
    budget = float(memory_mb) * 2**20

    def need(rows: int, parts: int) -> float:
        return ate_working_memory(rows, parts, n_genes, n_latent, n_treatments, n_threads, hidden, guide_hidden)

    if not budget > 0 or need(1, 1) > budget:
        raise ValueError(
            f"ATE memory budget of {memory_mb} MB is too small: one treatment row of one "
            f"particle needs {need(1, 1) / 2**20:.2f} MB ({n_genes} genes, {n_treatments} "
            f"treatments x {n_latent} latents); the budget must be at least {need(1, 1) / 2**20:.2f} MB"
        )
    particles = max(1, int(particles))
    if need(1, particles) > budget:
        particles = max(1, int((budget - need(1, 0)) // (need(1, 1) - need(1, 0))))
    lo, hi = 1, max(1, int(n_rows))  # the largest row count that fits (need grows with rows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid, particles) <= budget else (lo, mid - 1)
    return lo, particles


def widest_layer(module, exclude: int = -1) -> int:
    """The largest ``out_features`` of the module's linear layers (except ``exclude``)."""
    widths = [m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear) and m.out_features != exclude]
    return max(widths, default=0)


def guide_hidden_width(guide) -> int:
    """Width of a guide network run per treatment and particle (0 if none)."""
    return contract.treatment_network_width(guide)
