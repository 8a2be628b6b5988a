"""Simulators of single-cell perturbation count data with known ground truth.

Three generators, one per model family of the zoo (docs/data.md, "Simulators"):

- :func:`sparse_shift`: the sVAE paper's benchmark (sparse mechanism shift, docs/models.md "sVAE family").
- :func:`combinatorial`: SAMS-VAE's additive sparse latent effects, with doubles (docs/models.md "SAMS-VAE").
- :func:`factorized`: FCR's covariate / treatment / interaction latent blocks (docs/models.md "FCR").

All share one observation model. A random decoder maps the latent ``z_i`` to gene
proportions ``rho_i = softmax(f(z_i))``; each cell gets a library size
``l_i ~ LogNormal(log library_size, library_log_sd)``; counts are
``x_ig ~ NB(mean l_i * rho_ig, inverse dispersion theta_g)``, drawn as Gamma-Poisson,
with ``theta_g ~ LogNormal(log dispersion, dispersion_log_sd)`` (or Poisson).

Every simulator returns an :class:`anndata.AnnData` with

- ``X``: ``scipy.sparse.csr_matrix`` float32 of integer counts, (n_cells, n_genes);
  ``var_names`` ``gene_000``...; ``obs_names`` ``cell_00000``...
- ``obs["perturbation"]``: categorical str labels, ``"control"`` for controls, doubles
  ``"pA+pB"`` with the singles sorted; ``obs["split"]``: categorical train / val / test.
- ``obsm["z_true"]``: float32 (n_cells, n_latent), the true latent of each cell.
- ``uns["ground_truth"]``: a dict that survives ``write_h5ad`` / ``read_h5ad`` (arrays,
  lists of str, numbers, nested dicts) with at least ``"simulator"``, ``"params"`` (the
  arguments; ``None`` values are left out), ``"perturbations"`` (single names, row order),
  ``"targets"`` (int8, n_perturbations x n_latent), ``"shifts"`` (float32, same shape,
  0 off target), ``"decoder"`` (the decoder's weights, see :func:`decoder_proportions`),
  ``"library_size"`` and, for NB counts, ``"theta"`` (float32, n_genes).

Randomness: each simulator derives independent streams (design, latents, decoder, counts,
split) from ``seed`` via ``numpy.random.SeedSequence``, so the outputs are deterministic,
and changing e.g. ``likelihood`` leaves the latents and the decoder unchanged.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyro_perturb.data.splits import (
    _as_categorical,
    _check_fraction,
    _stratified_train_val,
    combinatorial_split,
    heldout_perturbation_split,
    random_split,
)
from pyro_perturb.data.simulate_common import (  # noqa: F401  (shared with the comparative simulator)
    CONTROL,
    _GENE_BIAS_SD,
    _HIDDEN_BIAS_SD,
    _LIKELIHOODS,
    _NEGATIVE_SLOPE,
    _check_int,
    _check_likelihood,
    _check_positive,
    _leaky_relu,
    _names,
    _orthogonal,
    _params,
    _rngs,
    _sample_counts,
)
from pyro_perturb.normalize import LIBRARY, lognormalize

__all__ = [
    "CONTROL",
    "DEPTH_PRESETS",
    "sparse_shift",
    "combinatorial",
    "factorized",
    "decoder_proportions",
    "true_ate",
]

# Number of latents used to calibrate the decoder's output scale.
_CALIBRATION_CELLS = 4096
# Rows of z decoded and sampled at once: bounds memory for large simulations.
_CHUNK_ELEMENTS = 4_000_000

#: Depth presets of :func:`combinatorial` (``depth=``): library median, log-library sd and
#: effect size. "standard" is the historical default; "shallow" matches shallow public
#: CRISPR screens (median 130-190 UMIs over 300-450 genes, log-library sd 0.55-0.7, and
#: mostly weak perturbation effects).
DEPTH_PRESETS: dict[str, dict[str, float]] = {
    "standard": {"library_size": 3000, "library_log_sd": 0.3, "shift_sd": 1.5},
    "shallow": {"library_size": 150, "library_log_sd": 0.6, "shift_sd": 0.5},
}


# --------------------------------------------------------------------------- helpers


def _hidden(decoder: dict[str, Any], z: np.ndarray) -> np.ndarray:
    """The decoder's last hidden activations, float64 (n, hidden)."""
    h = np.asarray(z, dtype=np.float64)
    for k in range(int(decoder["n_layers"]) - 1):
        h = _leaky_relu(h @ decoder[f"weight_{k}"].astype(np.float64) + decoder[f"bias_{k}"])
    return h


def decoder_proportions(decoder: dict[str, Any], z: np.ndarray) -> np.ndarray:
    """Gene proportions ``softmax(f(z))`` of a simulator's true decoder.

    Args:
        decoder: ``adata.uns["ground_truth"]["decoder"]``: ``n_layers`` linear layers
            ``weight_k`` (in, out) and ``bias_k`` (out,), leaky-ReLU (slope
            ``negative_slope``) between them, softmax over genes after the last.
        z: (..., n_latent) latents.

    Returns:
        (..., n_genes) float64 proportions (each row sums to 1).
    """
    n = int(decoder["n_layers"])
    logits = _hidden(decoder, z) @ decoder[f"weight_{n - 1}"].astype(np.float64)
    logits = logits + decoder[f"bias_{n - 1}"]
    logits -= logits.max(axis=-1, keepdims=True)  # stable softmax
    rho = np.exp(logits)
    rho /= rho.sum(axis=-1, keepdims=True)
    return rho


def _random_decoder(
    rng: np.random.Generator,
    n_latent: int,
    n_genes: int,
    hidden: int,
    n_hidden_layers: int,
    hidden_bias_sd: float,
    z_reference: np.ndarray,
    logit_sd: float,
) -> dict[str, Any]:
    """A random decoder: ``n_hidden_layers`` leaky-ReLU layers, then a linear to genes.

    Hidden weights are random orthogonal matrices (norm preserving, so the scale of z
    survives the layers). The output weights are Gaussian, rescaled so that on
    ``z_reference`` (a sample of the simulated latents) the logits, centred per cell, have
    standard deviation ``logit_sd``: the softmax is then neither flat nor one-hot whatever
    the latent's scale, width or depth. Output bias: gene baseline ~ N(0, 0.5^2).

    Returns:
        The decoder dict (float32 arrays) as stored in the ground truth.
    """
    dims = [n_latent] + [hidden] * n_hidden_layers
    decoder: dict[str, Any] = {"n_layers": n_hidden_layers + 1, "negative_slope": _NEGATIVE_SLOPE}
    for k in range(n_hidden_layers):
        decoder[f"weight_{k}"] = _orthogonal(rng, dims[k], dims[k + 1]).astype(np.float32)
        decoder[f"bias_{k}"] = (hidden_bias_sd * rng.standard_normal(dims[k + 1])).astype(np.float32)
    w_out = rng.standard_normal((dims[-1], n_genes))
    bias_out = _GENE_BIAS_SD * rng.standard_normal(n_genes)
    if z_reference.shape[0] > _CALIBRATION_CELLS:
        rows = rng.choice(z_reference.shape[0], _CALIBRATION_CELLS, replace=False)
        z_reference = z_reference[np.sort(rows)]
    logits = _hidden(decoder, z_reference) @ w_out
    logits -= logits.mean(axis=1, keepdims=True)  # softmax ignores per-cell offsets
    spread = float(logits.std())
    scale = logit_sd / spread if spread > 0 else 1.0
    decoder[f"weight_{n_hidden_layers}"] = (w_out * scale).astype(np.float32)
    decoder[f"bias_{n_hidden_layers}"] = bias_out.astype(np.float32)
    return decoder


def _draw_theta(rng: np.random.Generator, n_genes: int, dispersion: float, log_sd: float) -> np.ndarray:
    return np.exp(np.log(dispersion) + log_sd * rng.standard_normal(n_genes)).astype(np.float32)


def _simulate_counts(
    rng: np.random.Generator,
    z: np.ndarray,
    decoder: dict[str, Any],
    theta: np.ndarray | None,
    library_size: float,
    library_log_sd: float,
) -> sp.csr_matrix:
    """Counts for each row of z: (n_cells, n_genes) CSR float32, built in row chunks."""
    n_cells = z.shape[0]
    n_genes = decoder[f"bias_{int(decoder['n_layers']) - 1}"].shape[0]
    library = np.exp(np.log(library_size) + library_log_sd * rng.standard_normal(n_cells))
    chunk = max(1, _CHUNK_ELEMENTS // max(n_genes, 1))
    blocks = []
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        mean = decoder_proportions(decoder, z[start:stop]) * library[start:stop, None]
        counts = _sample_counts(rng, mean, theta)
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
    if not blocks:
        return sp.csr_matrix((0, n_genes), dtype=np.float32)
    x = sp.vstack(blocks, format="csr")
    x.sort_indices()
    return x.astype(np.float32)


def _assemble(
    x: sp.csr_matrix,
    obs: dict[str, Any],
    obsm: dict[str, np.ndarray],
    ground_truth: dict[str, Any],
) -> ad.AnnData:
    """Build the AnnData of the common contract (names, categoricals, float32 latents)."""
    n_cells, n_genes = x.shape
    obs_frame = pd.DataFrame(
        {
            key: (pd.Categorical(np.asarray(v, dtype=object)) if np.asarray(v).dtype.kind in "OU" else v)
            for key, v in obs.items()
        },
        index=pd.Index(_names("cell_", n_cells, 5)),
    )
    var = pd.DataFrame(index=pd.Index(_names("gene_", n_genes, 3)))
    adata = ad.AnnData(X=x, obs=obs_frame, var=var)
    for key, value in obsm.items():
        adata.obsm[key] = np.ascontiguousarray(value, dtype=np.float32)
    adata.uns["ground_truth"] = ground_truth
    adata.uns["simulator"] = ground_truth["simulator"]
    return adata


def _monte_carlo_mean_lognorm(
    rng: np.random.Generator,
    decoder: dict[str, Any],
    z: np.ndarray,
    theta: np.ndarray | None,
    library: float | np.ndarray,
) -> np.ndarray:
    """Mean over axis -2 of log2(1 + counts normalised to 1e4) for z of shape (k, n, L).

    ``library`` is one library size for every cell, or (n, 1) per-cell library sizes.
    """
    mean = decoder_proportions(decoder, z) * library
    counts = _sample_counts(rng, mean, theta).astype(np.float64)
    return lognormalize(counts).mean(axis=-2)


def true_ate(
    decoder: dict[str, Any],
    shifts: np.ndarray,
    theta: np.ndarray | None = None,
    n_draws: int = 2000,
    library: float = LIBRARY,
    seed: int = 0,
    library_log_sd: float = 0.0,
) -> np.ndarray:
    """Average treatment effects of the true generator ``z = z_basal + shift``, by Monte Carlo.

    For each label, ``n_draws`` cells are generated with ``z_basal ~ N(0, I)``, counts
    ``NB(library * softmax(f(z)), theta)`` (Poisson if ``theta`` is None), normalised to
    1e4 counts, ``log2(1 + x)``, and averaged; the ATE is that mean minus the same mean at
    shift 0 (control), as the data ATE of docs/evaluation.md. The same ``z_basal`` draws are used for
    every label and for control (common random numbers: less Monte Carlo noise in the
    difference). Fits :func:`sparse_shift` and :func:`combinatorial`, whose controls are
    ``z ~ N(0, I)``.

    The statistic depends on sequencing depth: at a shallow depth the normalised counts
    are coarse (a gene with 1 of 150 UMIs jumps to log2(1 + 1e4 / 150)) and zeros are
    common, so the ATE at 150 UMIs per cell differs from the ATE at 1e4 even for the
    same generator. With ``library_log_sd > 0`` each draw gets its own library size
    ``library * exp(library_log_sd * N(0, 1))`` (the same for every label: common random
    numbers again), as the simulators draw cells' libraries: with the simulation's
    ``library_size`` and ``library_log_sd`` this is the ATE that the simulated cells' own
    data estimate. With ``library_log_sd = 0`` no library is drawn, and the result is the
    same as before that option existed.

    Args:
        decoder: ``ground_truth["decoder"]``.
        shifts: (n_labels, n_latent) latent shift of each label.
        theta: (n_genes,) inverse dispersion, or None for Poisson counts.
        n_draws: cells drawn per label.
        library: library size (the median one when ``library_log_sd > 0``).
        seed: random seed.
        library_log_sd: sd of the log library size over draws (0: fixed ``library``).

    Returns:
        (n_labels, n_genes) float32 ATE.
    """
    shifts = np.atleast_2d(np.asarray(shifts, dtype=np.float64))
    n_draws = _check_int("n_draws", n_draws, 1)
    library = _check_positive("library", library)
    library_log_sd = _check_positive("library_log_sd", library_log_sd, allow_zero=True)
    n_labels, n_latent = shifts.shape
    n_genes = decoder[f"bias_{int(decoder['n_layers']) - 1}"].shape[0]
    rng_basal, rng_counts = _rngs(seed, 2)
    z_basal = rng_basal.standard_normal((n_draws, n_latent))
    libraries: float | np.ndarray = library
    if library_log_sd > 0:
        # drawn after z_basal from the same stream, so z_basal is the fixed-library one
        libraries = library * np.exp(library_log_sd * rng_basal.standard_normal((n_draws, 1)))
    control = _monte_carlo_mean_lognorm(rng_counts, decoder, z_basal[None], theta, libraries)[0]
    ate = np.empty((n_labels, n_genes), dtype=np.float64)
    # vectorised over labels too, in chunks that keep (k, n_draws, n_genes) arrays small
    per_chunk = max(1, _CHUNK_ELEMENTS // (n_draws * max(n_genes, 1)))
    for start in range(0, n_labels, per_chunk):
        stop = min(start + per_chunk, n_labels)
        z = z_basal[None, :, :] + shifts[start:stop, None, :]
        ate[start:stop] = _monte_carlo_mean_lognorm(rng_counts, decoder, z, theta, libraries) - control
    return ate.astype(np.float32)


# --------------------------------------------------------------------------- simulators


def sparse_shift(
    n_latent: int = 15,
    n_perturbations: int = 100,
    cells_per_perturbation: int = 250,
    n_control_cells: int = 250,
    n_genes: int = 100,
    n_heldout: int = 20,
    min_targets: int = 1,
    max_targets: int = 3,
    shift_mean: float = 5.0,
    shift_sd: float = 0.5,
    hidden: int = 40,
    likelihood: str = "nb",
    library_size: float = 2000,
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    library_log_sd: float = 0.3,
    dispersion: float = 5.0,
    dispersion_log_sd: float = 0.5,
    logit_sd: float = 1.0,
) -> ad.AnnData:
    """The sVAE benchmark: sparse mechanism shift (Lopez et al. 2023; docs/models.md, "sVAE family").

    Perturbation ``a`` (named ``p000``, ``p001``, ...) targets between ``min_targets`` and
    ``max_targets`` latents (uniform count, uniform choice); each targeted latent is
    shifted by ``sign * |N(shift_mean, shift_sd)|`` with a random sign; controls have no
    shift. ``z_i ~ N(shift_{a_i}, I)``. Decoder: 3 leaky-ReLU(0.2) layers of width
    ``hidden`` with random orthogonal weights and no biases, then a linear layer to genes
    and a softmax. Because z has entries of size ~``shift_mean``, the output layer is
    scaled so that the per-cell-centred logits have sd ``logit_sd`` over the simulated
    cells (default 1: proportions span about two orders of magnitude, and a strong
    perturbation changes some genes by several-fold). Counts: NB or Poisson at library
    ``~ LogNormal(log library_size, library_log_sd)``.

    ``n_heldout`` perturbations chosen at random are held out: their cells have split
    "test" and ``obs["heldout"]`` True; all other cells, controls included, are split
    train / val per label with ``val_fraction`` in val.

    Args:
        n_latent: latent size L.
        n_perturbations: number of perturbations P.
        cells_per_perturbation: cells per perturbation.
        n_control_cells: control cells.
        n_genes: genes G.
        n_heldout: perturbations held out for the OOD task (0 <= n_heldout <= P).
        min_targets, max_targets: range of the number of targeted latents.
        shift_mean, shift_sd: magnitude distribution of a shift.
        hidden: width of the decoder's hidden layers.
        likelihood: "nb" or "poisson".
        library_size: median library size.
        val_fraction: fraction of the non-held-out cells in "val".
        seed: random seed.
        library_log_sd: sd of log library size.
        dispersion, dispersion_log_sd: ``theta_g ~ LogNormal(log dispersion, dispersion_log_sd)``.
        logit_sd: spread of the decoder's logits (see above).

    Returns:
        AnnData of the common contract, n_cells = n_control_cells + P *
        cells_per_perturbation, with ``obs["heldout"]`` (bool) and, in
        ``uns["ground_truth"]``, also ``"heldout"`` (sorted names).
    """
    params = _params(dict(locals()))
    n_latent = _check_int("n_latent", n_latent, 1)
    n_perturbations = _check_int("n_perturbations", n_perturbations, 1)
    cells_per_perturbation = _check_int("cells_per_perturbation", cells_per_perturbation, 1)
    n_control_cells = _check_int("n_control_cells", n_control_cells, 0)
    n_genes = _check_int("n_genes", n_genes, 2)
    n_heldout = _check_int("n_heldout", n_heldout, 0)
    if n_heldout > n_perturbations:
        raise ValueError(f"n_heldout ({n_heldout}) exceeds n_perturbations ({n_perturbations})")
    min_targets = _check_int("min_targets", min_targets, 1)
    max_targets = _check_int("max_targets", max_targets, 1)
    if not min_targets <= max_targets <= n_latent:
        raise ValueError(
            f"need 1 <= min_targets <= max_targets <= n_latent, got min_targets={min_targets}, "
            f"max_targets={max_targets}, n_latent={n_latent}"
        )
    val_fraction = _check_fraction("val_fraction", val_fraction, high_open=True)
    shift_mean = _check_positive("shift_mean", shift_mean, allow_zero=True)
    shift_sd = _check_positive("shift_sd", shift_sd, allow_zero=True)
    hidden = _check_int("hidden", hidden, 1)
    _check_likelihood(likelihood)
    library_size = _check_positive("library_size", library_size)
    library_log_sd = _check_positive("library_log_sd", library_log_sd, allow_zero=True)
    dispersion = _check_positive("dispersion", dispersion)
    dispersion_log_sd = _check_positive("dispersion_log_sd", dispersion_log_sd, allow_zero=True)
    logit_sd = _check_positive("logit_sd", logit_sd)

    rng_design, rng_latent, rng_decoder, rng_counts = _rngs(seed, 4)
    names = _names("p", n_perturbations, 3)

    # design: which latents each perturbation targets, and by how much
    targets = np.zeros((n_perturbations, n_latent), dtype=np.int8)
    for a in range(n_perturbations):
        k = rng_design.integers(min_targets, max_targets + 1)
        targets[a, rng_design.choice(n_latent, size=k, replace=False)] = 1
    magnitude = np.abs(rng_design.normal(shift_mean, shift_sd, size=targets.shape))
    sign = rng_design.choice(np.array([-1.0, 1.0]), size=targets.shape)
    shifts = (targets * sign * magnitude).astype(np.float32)
    heldout = sorted(rng_design.choice(names, size=n_heldout, replace=False).tolist())

    # cells: controls first, then each perturbation's block
    code = np.concatenate(
        [np.full(n_control_cells, -1), np.repeat(np.arange(n_perturbations), cells_per_perturbation)]
    )
    labels = np.where(code < 0, CONTROL, np.asarray(names, dtype=object)[np.maximum(code, 0)])
    z_mean = np.where(code[:, None] < 0, 0.0, shifts[np.maximum(code, 0)].astype(np.float64))
    z = z_mean + rng_latent.standard_normal((code.shape[0], n_latent))

    decoder = _random_decoder(rng_decoder, n_latent, n_genes, hidden, 3, 0.0, z, logit_sd)
    theta = _draw_theta(rng_decoder, n_genes, dispersion, dispersion_log_sd)
    x = _simulate_counts(
        rng_counts, z, decoder, theta if likelihood == "nb" else None, library_size, library_log_sd
    )

    ground_truth: dict[str, Any] = {
        "simulator": "sparse_shift",
        "params": params,
        "perturbations": names,
        "targets": targets,
        "shifts": shifts,
        "heldout": heldout,
        "decoder": decoder,
        "library_size": library_size,
    }
    if likelihood == "nb":
        ground_truth["theta"] = theta
    adata = _assemble(
        x,
        {"perturbation": labels, "split": np.full(code.shape[0], "train")},
        {"z_true": z},
        ground_truth,
    )
    adata = heldout_perturbation_split(adata, heldout, val_fraction=val_fraction, seed=seed)
    adata.obs["heldout"] = np.isin(labels, heldout)
    return adata


def combinatorial(
    n_latent: int = 10,
    n_singles: int = 20,
    n_doubles: int = 30,
    cells_per_perturbation: int = 100,
    n_control_cells: int = 500,
    n_genes: int = 200,
    mask_prob: float = 0.2,
    shift_sd: float | None = None,
    hidden: int = 64,
    likelihood: str = "nb",
    library_size: float | None = None,
    frac_combinations_train: float | None = None,
    seed: int = 0,
    *,
    n_ate_draws: int = 2000,
    library_log_sd: float | None = None,
    depth: str | None = None,
    dispersion: float = 5.0,
    dispersion_log_sd: float = 0.5,
    logit_sd: float = 1.0,
) -> ad.AnnData:
    """SAMS-VAE's setting: sparse additive latent effects and double perturbations.

    ``z_i = z_basal_i + d_i @ (E * M)`` (docs/models.md, "SAMS-VAE") with ``z_basal ~ N(0, I)``,
    ``E_tl ~ N(0, shift_sd^2)`` and a mask ``M_tl ~ Bernoulli(mask_prob)``; a single with
    no target gets one latent switched on at random, so every single has at least one.
    Doubles are ``n_doubles`` distinct random pairs of singles; a double's shift is the
    sum of its two singles' masked shifts. Singles are named ``p000``...; a double
    ``"pA+pB"`` (sorted). Decoder: 2 leaky-ReLU(0.2) hidden layers of width ``hidden``
    with random orthogonal weights and N(0, 0.5^2) biases (the biases make the response
    to a shift depend on the basal state), then a linear layer to genes scaled so that the
    per-cell-centred logits have sd ``logit_sd`` on the simulated cells, and a softmax.
    Expression is therefore additive in latent space only, not in expression space.

    Ground truth adds ``"embedding"`` (E, float32 T x L; ``"shifts"`` = E * M,
    ``"targets"`` = M), ``"doubles"`` (sorted labels), ``"double_shifts"`` (float32,
    n_doubles x L), ``"ate_labels"`` (singles then doubles) and ``"ate"`` (float32,
    n_labels x n_genes): the true average treatment effect (normalise to 1e4 counts,
    log2(1 + x), treated mean minus control mean), by Monte Carlo from the true generator
    at library 1e4 with ``n_ate_draws`` cells per label (:func:`true_ate`), and
    ``"ate_observed_depth"`` (same shape and labels): the same statistic at the simulated
    cells' own depth, each Monte Carlo cell with a library drawn like the simulated ones
    (``LogNormal(log library_size, library_log_sd)``). The two differ, the more so the
    shallower the data: the data ATE of the simulated counts (normalised to 1e4, log2(1 + x),
    a label's mean minus control's) estimates ``"ate_observed_depth"``, not ``"ate"``.
    Both use the same basal draws. ``obsm["z_basal_true"]`` holds the basal latents.

    Depth presets (``depth``): ``None`` or ``"standard"`` is library median 3000,
    ``library_log_sd`` 0.3, ``shift_sd`` 1.5. ``"shallow"`` mimics shallow real CRISPR
    screens over a few hundred genes: library median 150 UMIs, ``library_log_sd`` 0.6 (the
    spread of real shallow libraries) and small effects, ``shift_sd`` 0.5 (with 100 cells
    per label, the pseudobulk deltas of two halves of a label's cells correlate about 0.1,
    as in such screens). A preset only fills ``library_size``, ``library_log_sd`` and
    ``shift_sd`` when they are not passed; explicit values win. E.g.
    ``combinatorial(depth="shallow", n_genes=300)`` or, from the command line,
    ``pyro-perturb simulate combinatorial --set depth=shallow --set n_genes=300``.

    Splits: by default a random 64 / 16 / 20 % train / val / test split of the cells. If
    ``frac_combinations_train`` is given, the result of
    :func:`pyro_perturb.data.splits.combinatorial_split` (half the doubles held out as
    test, that fraction of the others kept for training, the rest dropped) is returned.

    Args:
        n_latent: latent size L.
        n_singles: number of single perturbations T.
        n_doubles: number of doubles (<= T (T - 1) / 2).
        cells_per_perturbation: cells per single and per double.
        n_control_cells: control cells.
        n_genes: genes G.
        mask_prob: probability that a single targets a given latent.
        shift_sd: sd of the effect embedding E (the effect size); default from ``depth``.
        hidden: decoder width.
        likelihood: "nb" or "poisson".
        library_size: median library size; default from ``depth``.
        frac_combinations_train: None (random split) or a fraction in [0, 1].
        seed: random seed.
        n_ate_draws: Monte Carlo cells per label for each true ATE.
        library_log_sd: sd of log library size; default from ``depth``.
        depth: ``None``, ``"standard"`` or ``"shallow"``: the preset of the three above.
        dispersion, dispersion_log_sd, logit_sd: as in :func:`sparse_shift`.

    Returns:
        AnnData of the common contract.
    """
    arguments = dict(locals())
    if depth is not None and (not isinstance(depth, str) or depth not in DEPTH_PRESETS):
        raise ValueError(f"depth must be None or one of {sorted(DEPTH_PRESETS)}, got {depth!r}")
    preset = DEPTH_PRESETS[depth or "standard"]
    shift_sd = preset["shift_sd"] if shift_sd is None else shift_sd
    library_size = preset["library_size"] if library_size is None else library_size
    library_log_sd = preset["library_log_sd"] if library_log_sd is None else library_log_sd
    # the recorded params hold the values used (same keys and order as without presets)
    arguments.update(shift_sd=shift_sd, library_size=library_size, library_log_sd=library_log_sd)
    params = _params(arguments)
    n_latent = _check_int("n_latent", n_latent, 1)
    n_singles = _check_int("n_singles", n_singles, 1)
    n_doubles = _check_int("n_doubles", n_doubles, 0)
    max_doubles = n_singles * (n_singles - 1) // 2
    if n_doubles > max_doubles:
        raise ValueError(
            f"n_doubles ({n_doubles}) exceeds the {max_doubles} distinct pairs of {n_singles} singles"
        )
    cells_per_perturbation = _check_int("cells_per_perturbation", cells_per_perturbation, 1)
    n_control_cells = _check_int("n_control_cells", n_control_cells, 0)
    n_genes = _check_int("n_genes", n_genes, 2)
    mask_prob = _check_positive("mask_prob", mask_prob, allow_zero=True)
    if mask_prob > 1:
        raise ValueError(f"mask_prob must lie in [0, 1], got {mask_prob}")
    shift_sd = _check_positive("shift_sd", shift_sd, allow_zero=True)
    hidden = _check_int("hidden", hidden, 1)
    _check_likelihood(likelihood)
    library_size = _check_positive("library_size", library_size)
    n_ate_draws = _check_int("n_ate_draws", n_ate_draws, 1)
    library_log_sd = _check_positive("library_log_sd", library_log_sd, allow_zero=True)
    dispersion = _check_positive("dispersion", dispersion)
    dispersion_log_sd = _check_positive("dispersion_log_sd", dispersion_log_sd, allow_zero=True)
    logit_sd = _check_positive("logit_sd", logit_sd)
    if frac_combinations_train is not None and n_doubles == 0:
        raise ValueError("frac_combinations_train needs n_doubles >= 1")

    rng_design, rng_latent, rng_decoder, rng_counts, rng_ate = _rngs(seed, 5)
    names = _names("p", n_singles, 3)

    # design: masked effect embedding, every single with at least one target
    embedding = (shift_sd * rng_design.standard_normal((n_singles, n_latent))).astype(np.float32)
    mask = (rng_design.random((n_singles, n_latent)) < mask_prob).astype(np.int8)
    for t in np.flatnonzero(mask.sum(axis=1) == 0):
        mask[t, rng_design.integers(n_latent)] = 1
    shifts = (embedding * mask).astype(np.float32)
    all_pairs = list(combinations(range(n_singles), 2))
    chosen = rng_design.choice(len(all_pairs), size=n_doubles, replace=False) if n_doubles else []
    pairs = sorted(all_pairs[i] for i in chosen)  # i < j, names zero-padded: labels sorted
    doubles = [f"{names[i]}+{names[j]}" for i, j in pairs]
    dosage_doubles = np.zeros((n_doubles, n_singles))
    for row, (i, j) in enumerate(pairs):
        dosage_doubles[row, [i, j]] = 1.0
    double_shifts = (dosage_doubles @ shifts.astype(np.float64)).astype(np.float32)

    # cells: controls, singles, doubles; dosage rows d_i
    dosage_labels = np.vstack([np.zeros((1, n_singles)), np.eye(n_singles), dosage_doubles])
    label_names = [CONTROL] + names + doubles
    counts_per_label = [n_control_cells] + [cells_per_perturbation] * (n_singles + n_doubles)
    code = np.repeat(np.arange(len(label_names)), counts_per_label)
    labels = np.asarray(label_names, dtype=object)[code]
    z_basal = rng_latent.standard_normal((code.shape[0], n_latent))
    z = z_basal + dosage_labels[code] @ shifts.astype(np.float64)

    decoder = _random_decoder(rng_decoder, n_latent, n_genes, hidden, 2, _HIDDEN_BIAS_SD, z, logit_sd)
    theta = _draw_theta(rng_decoder, n_genes, dispersion, dispersion_log_sd)
    theta_used = theta if likelihood == "nb" else None
    x = _simulate_counts(rng_counts, z, decoder, theta_used, library_size, library_log_sd)

    label_shifts = np.vstack([shifts, double_shifts])
    ate_seed = int(rng_ate.integers(2**32))
    ate = true_ate(decoder, label_shifts, theta_used, n_draws=n_ate_draws, seed=ate_seed)
    ate_observed_depth = true_ate(
        decoder, label_shifts, theta_used, n_draws=n_ate_draws, library=library_size,
        library_log_sd=library_log_sd, seed=ate_seed,
    )

    ground_truth: dict[str, Any] = {
        "simulator": "combinatorial",
        "params": params,
        "perturbations": names,
        "targets": mask,
        "shifts": shifts,
        "embedding": embedding,
        "doubles": doubles,
        "double_shifts": double_shifts.reshape(n_doubles, n_latent),
        "ate": ate,
        "ate_observed_depth": ate_observed_depth,
        "ate_labels": names + doubles,
        "decoder": decoder,
        "library_size": library_size,
    }
    if likelihood == "nb":
        ground_truth["theta"] = theta
    split = random_split(code.shape[0], (0.64, 0.16, 0.20), seed=seed)
    adata = _assemble(
        x,
        {"perturbation": labels, "split": split},
        {"z_true": z, "z_basal_true": z_basal},
        ground_truth,
    )
    adata.obs["split"] = _as_categorical(split)
    if frac_combinations_train is not None:
        adata = combinatorial_split(adata, frac_combinations_train, seed=seed)
    return adata


def _pick_heldout_pairs(
    rng: np.random.Generator, n_covariates: int, n_treatments: int, n_pairs: int
) -> list[tuple[int, int]]:
    """Random (covariate, treatment) pairs such that, once removed, every covariate keeps
    a treated training group and every treatment keeps a training covariate."""
    upper = n_covariates * n_treatments - max(n_covariates, n_treatments)
    if n_pairs > upper:
        raise ValueError(
            f"n_heldout_pairs ({n_pairs}) too large: with {n_covariates} covariates and "
            f"{n_treatments} treatments at most {upper} pairs can be held out while every "
            "covariate and treatment stays in training"
        )
    all_pairs = [(c, t) for c in range(n_covariates) for t in range(n_treatments)]
    chosen: list[tuple[int, int]] = []
    per_cov = np.full(n_covariates, n_treatments)  # training treated groups left
    per_trt = np.full(n_treatments, n_covariates)
    for idx in rng.permutation(len(all_pairs)):
        if len(chosen) == n_pairs:
            break
        c, t = all_pairs[idx]
        if per_cov[c] > 1 and per_trt[t] > 1:
            chosen.append((c, t))
            per_cov[c] -= 1
            per_trt[t] -= 1
    if len(chosen) < n_pairs:
        # greedy order can dead-end below the bound; rare, and a clear error beats a loop
        raise ValueError(
            f"could not hold out {n_pairs} pairs with seed-chosen order; use fewer pairs "
            "or another seed"
        )
    return sorted(chosen)


def factorized(
    n_covariates: int = 4,
    n_treatments: int = 6,
    n_latent_x: int = 4,
    n_latent_t: int = 4,
    n_latent_tx: int = 4,
    cells_per_group: int = 100,
    n_genes: int = 200,
    n_heldout_pairs: int = 3,
    hidden: int = 64,
    likelihood: str = "nb",
    library_size: float = 3000,
    interaction_scale: float = 1.0,
    seed: int = 0,
    *,
    val_fraction: float = 0.2,
    covariate_scale: float = 2.0,
    treatment_scale: float = 2.0,
    interaction_dim: int = 8,
    library_log_sd: float = 0.3,
    dispersion: float = 5.0,
    dispersion_log_sd: float = 0.5,
    logit_sd: float = 1.0,
) -> ad.AnnData:
    """FCR's setting: covariate, treatment and interaction latent blocks (docs/models.md, "FCR").

    Covariate ``obs["cell_line"]`` (``line_0``...), treatment ``obs["perturbation"]``
    (``drug_0``... and ``"control"``); every (covariate, treatment) group, control
    included, has ``cells_per_group`` cells. Latents:

    - ``z_x ~ N(a_c, I)``, ``a_c ~ N(0, covariate_scale^2 I)``;
    - ``z_t ~ N(b_t, I)``, ``b_t ~ N(0, treatment_scale^2 I)``, ``b_control = 0``;
    - ``z_tx ~ N(g(c, t), I)``, ``g(c, t) = s * W2 leaky_relu(W1 (u_c * v_t) + b1)`` with
      random embeddings ``u_c, v_t ~ N(0, I_interaction_dim)``: the element-wise product
      makes g a genuine (non-additive) function of the pair, as in FCR's model, and the
      shared embeddings make held-out pairs predictable in principle. ``s`` rescales g to
      root-mean-square ``treatment_scale * interaction_scale`` over the treated pairs;
      ``g(c, control) = 0``.

    Counts from a random decoder of ``[z_x, z_t, z_tx]`` (same MLP as
    :func:`combinatorial`). ``n_heldout_pairs`` random treated pairs are held out (split
    "test", ``obs["heldout"]`` True) such that each held-out covariate keeps a treated
    training group and each held-out treatment a training covariate; all other cells are
    split train / val per group with ``val_fraction`` in val.

    Ground truth: ``"covariate_key"`` ("cell_line"), ``"covariates"``, ``"perturbations"``
    (drug names), ``"blocks"`` ({"z_x", "z_t", "z_tx"}: int64 [start, stop) columns of
    ``z_true``), ``"covariate_means"`` (C x Lx), ``"treatment_means"`` (T x Lt),
    ``"interaction_means"`` (C x T x Ltx), ``"heldout_pairs"`` ("line_k|drug_j"), and
    ``"targets"`` / ``"shifts"`` of shape (T, Lx + Lt + Ltx) aligned with ``z_true``'s
    columns: the treatment-block means b_t in the z_t columns (targets = nonzero), zero in
    the other blocks (the pair-dependent z_tx shift is in ``"interaction_means"``).

    Args:
        n_covariates, n_treatments: numbers of covariate levels C and drugs T.
        n_latent_x, n_latent_t, n_latent_tx: block sizes.
        cells_per_group: cells per (covariate, treatment) group.
        n_genes: genes G.
        n_heldout_pairs: treated pairs held out as test.
        hidden: decoder width.
        likelihood: "nb" or "poisson".
        library_size: median library size.
        interaction_scale: relative size of the interaction block's means.
        seed: random seed.
        val_fraction: fraction of the training groups' cells in "val".
        covariate_scale, treatment_scale: sd of the block means.
        interaction_dim: size of the embeddings u_c, v_t.
        library_log_sd, dispersion, dispersion_log_sd, logit_sd: as in :func:`sparse_shift`.

    Returns:
        AnnData of the common contract with ``obs["cell_line"]``, ``obs["heldout"]``, and
        ``obsm["z_x_true"]``, ``obsm["z_t_true"]``, ``obsm["z_tx_true"]``.
    """
    params = _params(dict(locals()))
    n_cov = _check_int("n_covariates", n_covariates, 1)
    n_trt = _check_int("n_treatments", n_treatments, 1)
    lx = _check_int("n_latent_x", n_latent_x, 1)
    lt = _check_int("n_latent_t", n_latent_t, 1)
    ltx = _check_int("n_latent_tx", n_latent_tx, 1)
    cells_per_group = _check_int("cells_per_group", cells_per_group, 1)
    n_genes = _check_int("n_genes", n_genes, 2)
    n_heldout_pairs = _check_int("n_heldout_pairs", n_heldout_pairs, 0)
    hidden = _check_int("hidden", hidden, 1)
    _check_likelihood(likelihood)
    library_size = _check_positive("library_size", library_size)
    interaction_scale = _check_positive("interaction_scale", interaction_scale, allow_zero=True)
    covariate_scale = _check_positive("covariate_scale", covariate_scale, allow_zero=True)
    treatment_scale = _check_positive("treatment_scale", treatment_scale, allow_zero=True)
    interaction_dim = _check_int("interaction_dim", interaction_dim, 1)
    library_log_sd = _check_positive("library_log_sd", library_log_sd, allow_zero=True)
    dispersion = _check_positive("dispersion", dispersion)
    dispersion_log_sd = _check_positive("dispersion_log_sd", dispersion_log_sd, allow_zero=True)
    logit_sd = _check_positive("logit_sd", logit_sd)
    val_fraction = _check_fraction("val_fraction", val_fraction, high_open=True)

    rng_design, rng_latent, rng_decoder, rng_counts, rng_split = _rngs(seed, 5)
    lines = [f"line_{c}" for c in range(n_cov)]
    drugs = [f"drug_{t}" for t in range(n_trt)]

    # block means
    cov_means = covariate_scale * rng_design.standard_normal((n_cov, lx))
    trt_means = treatment_scale * rng_design.standard_normal((n_trt, lt))
    u = rng_design.standard_normal((n_cov, interaction_dim))
    v = rng_design.standard_normal((n_trt, interaction_dim))
    w1 = rng_design.standard_normal((interaction_dim, hidden)) / math.sqrt(interaction_dim)
    b1 = _HIDDEN_BIAS_SD * rng_design.standard_normal(hidden)
    w2 = rng_design.standard_normal((hidden, ltx))
    g = _leaky_relu((u[:, None, :] * v[None, :, :]) @ w1 + b1) @ w2  # (C, T, Ltx)
    rms = float(np.sqrt(np.mean(g**2)))
    g = g * (treatment_scale * interaction_scale / rms if rms > 0 else 0.0)
    heldout_idx = _pick_heldout_pairs(rng_design, n_cov, n_trt, n_heldout_pairs)
    heldout_pairs = [f"{lines[c]}|{drugs[t]}" for c, t in heldout_idx]

    # cells: for each covariate, control then each drug (treatment index -1 = control)
    cov_code = np.repeat(np.arange(n_cov), (n_trt + 1) * cells_per_group)
    trt_code = np.tile(np.repeat(np.arange(-1, n_trt), cells_per_group), n_cov)
    n_cells = cov_code.shape[0]
    treated = trt_code >= 0
    t_safe = np.maximum(trt_code, 0)
    z_x = cov_means[cov_code] + rng_latent.standard_normal((n_cells, lx))
    z_t = np.where(treated[:, None], trt_means[t_safe], 0.0) + rng_latent.standard_normal((n_cells, lt))
    z_tx = np.where(treated[:, None], g[cov_code, t_safe], 0.0) + rng_latent.standard_normal((n_cells, ltx))
    z = np.hstack([z_x, z_t, z_tx])

    decoder = _random_decoder(rng_decoder, lx + lt + ltx, n_genes, hidden, 2, _HIDDEN_BIAS_SD, z, logit_sd)
    theta = _draw_theta(rng_decoder, n_genes, dispersion, dispersion_log_sd)
    x = _simulate_counts(
        rng_counts, z, decoder, theta if likelihood == "nb" else None, library_size, library_log_sd
    )

    perturbation = np.where(treated, np.asarray(drugs, dtype=object)[t_safe], CONTROL)
    cell_line = np.asarray(lines, dtype=object)[cov_code]
    group = np.asarray([f"{c}|{p}" for c, p in zip(cell_line, perturbation)], dtype=object)
    heldout = np.isin(group, heldout_pairs)
    split = _stratified_train_val(group, val_fraction, rng_split)
    split[heldout] = "test"

    n_latent = lx + lt + ltx
    shifts = np.zeros((n_trt, n_latent), dtype=np.float32)
    shifts[:, lx : lx + lt] = trt_means
    ground_truth: dict[str, Any] = {
        "simulator": "factorized",
        "params": params,
        "covariate_key": "cell_line",
        "covariates": lines,
        "perturbations": drugs,
        "targets": (shifts != 0).astype(np.int8),
        "shifts": shifts,
        "blocks": {
            "z_x": np.array([0, lx], dtype=np.int64),
            "z_t": np.array([lx, lx + lt], dtype=np.int64),
            "z_tx": np.array([lx + lt, n_latent], dtype=np.int64),
        },
        "covariate_means": cov_means.astype(np.float32),
        "treatment_means": trt_means.astype(np.float32),
        "interaction_means": g.astype(np.float32),
        "heldout_pairs": heldout_pairs,
        "decoder": decoder,
        "library_size": library_size,
    }
    if likelihood == "nb":
        ground_truth["theta"] = theta
    adata = _assemble(
        x,
        {"perturbation": perturbation, "cell_line": cell_line, "split": split},
        {"z_true": z, "z_x_true": z_x, "z_t_true": z_t, "z_tx_true": z_tx},
        ground_truth,
    )
    adata.obs["split"] = _as_categorical(split)
    adata.obs["heldout"] = heldout
    return adata


# the comparative (background / target) simulator lives in its own module
from pyro_perturb.data.simulate_comparative import comparative  # noqa: E402,F401
from pyro_perturb.data.simulate_dag import causal_dag  # noqa: E402,F401  (gene-graph DAG simulator)
from pyro_perturb.data.simulate_cyclic import cyclic_graph  # noqa: E402,F401  (gene-graph cyclic simulator)
