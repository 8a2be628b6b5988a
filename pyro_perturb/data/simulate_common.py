"""Helpers shared by the latent-variable simulators (:mod:`pyro_perturb.data.simulate` and
:mod:`pyro_perturb.data.simulate_comparative`): argument checks, seeded child streams, names,
random orthogonal layers, leaky ReLU and Gamma-Poisson counts, and the constants they share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Label of control cells.
CONTROL = "control"

_NEGATIVE_SLOPE = 0.2
# Gene-specific baseline log-abundance (output bias of the decoder): real genes differ in
# mean expression; sd 0.5 spreads baseline proportions over about e^{+-1} without making
# any gene so rare that it would be all-zero.
_GENE_BIAS_SD = 0.5
# Hidden-layer biases of the MLP decoders (combinatorial, factorized). With biases the
# network is no longer positively homogeneous, so the expression response to a shift
# depends on the basal state, as in a generic nonlinear decoder.
_HIDDEN_BIAS_SD = 0.5
# Number of latents used to calibrate the decoder's output scale.
_CALIBRATION_CELLS = 4096
# Rows of z decoded and sampled at once: bounds memory for large simulations.
_CHUNK_ELEMENTS = 4_000_000
_LIKELIHOODS = ("nb", "poisson")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def _check_likelihood(likelihood: str) -> str:
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
    return likelihood


def _params(arguments: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments in an h5ad-safe form (None cannot be stored: left out)."""
    return {k: v for k, v in arguments.items() if v is not None}


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    # independent child streams, so that e.g. the count noise does not shift the decoder
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _names(prefix: str, n: int, min_width: int) -> list[str]:
    """``prefix`` + zero-padded index: lexicographic order equals numeric order."""
    width = max(min_width, len(str(max(n - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _orthogonal(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    """A random (n_in, n_out) matrix with orthonormal rows or columns (Haar measure).

    QR of a Gaussian matrix, with the signs of R's diagonal folded into Q so that the
    distribution is uniform. For n_in <= n_out, ``x @ W`` preserves the norm of x; for
    n_in > n_out it is an orthogonal projection.
    """
    a = rng.standard_normal((max(n_in, n_out), min(n_in, n_out)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    return q if n_in >= n_out else q.T


def _leaky_relu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, _NEGATIVE_SLOPE * x)


def _sample_counts(
    rng: np.random.Generator,
    mean: np.ndarray,
    theta: np.ndarray | None,
) -> np.ndarray:
    """NB(mean, theta) as Gamma-Poisson (Poisson if theta is None); int64, mean's shape."""
    if theta is None:
        rate = mean
    else:
        theta64 = theta.astype(np.float64)
        # Gamma(shape theta, scale mu / theta) has mean mu; Poisson of it is NB(mu, theta)
        rate = rng.gamma(theta64, mean / theta64)
    return rng.poisson(rate)
