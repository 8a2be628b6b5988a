"""Simulator of comparative (background / target) data with known latent blocks
(docs/data.md, "Simulators"; the comparative models of docs/models.md).

Every cell has background latents ``z_b ~ N(0, I_Lb)``; perturbed (target) cells also
have salient latents ``z_s ~ N(m_k, I_Ls)`` whose mean ``m_k ~ N(0, salient_scale^2 I)``
depends on the cell's perturbation k, so perturbation identity lives in the salient block
only; controls have ``z_s = 0``. Counts come from a random decoder of ``[z_b, z_s]``:
``x ~ NB(l * softmax(f([z_b, z_s])), theta)`` (or Poisson), with ``f`` either a leaky-ReLU
MLP (``decoder="relu"``: piecewise affine, the setting of the block-identifiability
theory) or a tanh MLP (``decoder="smooth"``: outside it).

The AnnData follows the common contract of :mod:`pyro_perturb.data.simulate` with
``obsm["z_true"] = [z_b, z_s]`` (n, Lb + Ls), ``obsm["z_background_true"]``,
``obsm["z_salient_true"]`` and ``uns["ground_truth"]["blocks"]`` =
``{"background": [0, Lb], "salient": [Lb, Lb + Ls]}`` (int64 [start, stop) columns).
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyro_perturb.data.splits import _as_categorical, _check_fraction, _stratified_train_val
from pyro_perturb.data.simulate_common import (
    CONTROL,
    _GENE_BIAS_SD,
    _HIDDEN_BIAS_SD,
    _LIKELIHOODS,
    _check_int,
    _check_positive,
    _leaky_relu,
    _names,
    _orthogonal,
    _sample_counts,
)

#: decoder families: piecewise affine (leaky ReLU) or smooth (tanh)
DECODERS = ("relu", "smooth")
_CHUNK_ROWS = 20_000


def _activation(decoder: dict[str, Any], h: np.ndarray) -> np.ndarray:
    return np.tanh(h) if str(decoder["activation"]) == "smooth" else _leaky_relu(h)


def comparative_proportions(decoder: dict[str, Any], z: np.ndarray) -> np.ndarray:
    """Gene proportions ``softmax(f(z))`` of :func:`comparative`'s true decoder.

    Args:
        decoder: ``uns["ground_truth"]["decoder"]``: ``n_layers`` linear layers
            ``weight_k`` (in, out), ``bias_k`` (out,), the ``activation`` ("relu": leaky
            ReLU of slope 0.2, "smooth": tanh) between them, softmax after the last.
        z: ``(n, Lb + Ls)`` latents.

    Returns:
        ``(n, G)`` float64 proportions.
    """
    n = int(decoder["n_layers"])
    h = np.asarray(z, dtype=np.float64)
    for k in range(n - 1):
        h = _activation(decoder, h @ decoder[f"weight_{k}"].astype(np.float64) + decoder[f"bias_{k}"])
    logits = h @ decoder[f"weight_{n - 1}"].astype(np.float64) + decoder[f"bias_{n - 1}"]
    logits -= logits.max(axis=-1, keepdims=True)
    rho = np.exp(logits)
    return rho / rho.sum(axis=-1, keepdims=True)


def _random_decoder(rng, n_in: int, n_genes: int, hidden: int, n_hidden_layers: int, activation: str,
                    z_reference: np.ndarray, logit_sd: float) -> dict[str, Any]:
    """Orthogonal hidden layers with biases, Gaussian output layer rescaled so that the
    per-cell-centred logits of ``z_reference`` have sd ``logit_sd`` (as the other
    simulators' decoders)."""
    dims = [n_in] + [hidden] * n_hidden_layers
    decoder: dict[str, Any] = {"n_layers": n_hidden_layers + 1, "activation": activation}
    for k in range(n_hidden_layers):
        decoder[f"weight_{k}"] = _orthogonal(rng, dims[k], dims[k + 1]).astype(np.float32)
        decoder[f"bias_{k}"] = (_HIDDEN_BIAS_SD * rng.standard_normal(dims[k + 1])).astype(np.float32)
    w_out = rng.standard_normal((dims[-1], n_genes))
    decoder[f"weight_{n_hidden_layers}"] = w_out.astype(np.float32)
    decoder[f"bias_{n_hidden_layers}"] = np.zeros(n_genes, dtype=np.float32)
    h = np.asarray(z_reference, dtype=np.float64)
    for k in range(n_hidden_layers):
        h = _activation(decoder, h @ decoder[f"weight_{k}"].astype(np.float64) + decoder[f"bias_{k}"])
    logits = h @ w_out
    logits -= logits.mean(axis=1, keepdims=True)
    spread = float(logits.std())
    decoder[f"weight_{n_hidden_layers}"] = (w_out * (logit_sd / spread if spread > 0 else 1.0)).astype(np.float32)
    decoder[f"bias_{n_hidden_layers}"] = (_GENE_BIAS_SD * rng.standard_normal(n_genes)).astype(np.float32)
    return decoder


def comparative(
    n_background: int = 4,
    n_salient: int = 3,
    n_perturbations: int = 4,
    n_control_cells: int = 1000,
    cells_per_perturbation: int = 250,
    n_genes: int = 200,
    decoder: str = "relu",
    hidden: int = 64,
    n_hidden_layers: int = 1,
    likelihood: str = "nb",
    library_size: float = 3000,
    seed: int = 0,
    *,
    salient_scale: float = 1.5,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    library_log_sd: float = 0.3,
    dispersion: float = 5.0,
    dispersion_log_sd: float = 0.5,
    logit_sd: float = 1.5,
) -> ad.AnnData:
    """Background (controls) and target (perturbed) cells with known latent blocks.

    See the module docstring for the generative story. Labels ``pert_0``... and
    ``"control"``; ``obs["split"]`` train / val / test stratified by label.

    Args:
        n_background, n_salient: true block sizes Lb, Ls.
        n_perturbations: perturbation labels (target groups).
        n_control_cells, cells_per_perturbation: cells per group.
        n_genes: genes G.
        decoder: ``"relu"`` (leaky-ReLU MLP, piecewise affine) or ``"smooth"`` (tanh MLP).
        hidden, n_hidden_layers: decoder width and depth.
        likelihood: ``"nb"`` or ``"poisson"``.
        library_size: median library size.
        seed: random seed.
        salient_scale: sd of the per-label salient means ``m_k``.
        val_fraction, test_fraction: fractions of each label's cells in "val" and "test"
            (random cells of every label: a held-out set of the same conditions).
        library_log_sd, dispersion, dispersion_log_sd, logit_sd: as in
            :func:`pyro_perturb.data.simulate.sparse_shift` (logit_sd: spread of the
            decoder's logits).

    Returns:
        AnnData (see the module docstring); ground truth ``"perturbations"``,
        ``"targets"`` / ``"shifts"`` (T, Lb + Ls: the salient columns, ``m_k``),
        ``"salient_means"`` (T, Ls), ``"blocks"``, ``"decoder"``, ``"library_size"``,
        ``"theta"`` (NB).
    """
    params = {k: v for k, v in dict(locals()).items() if v is not None}
    lb = _check_int("n_background", n_background, 1)
    ls = _check_int("n_salient", n_salient, 1)
    n_pert = _check_int("n_perturbations", n_perturbations, 1)
    n_ctrl = _check_int("n_control_cells", n_control_cells, 1)
    per_pert = _check_int("cells_per_perturbation", cells_per_perturbation, 1)
    n_genes = _check_int("n_genes", n_genes, 2)
    hidden = _check_int("hidden", hidden, 1)
    n_hidden_layers = _check_int("n_hidden_layers", n_hidden_layers, 1)
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
    library_size = _check_positive("library_size", library_size)
    salient_scale = _check_positive("salient_scale", salient_scale, allow_zero=True)
    val_fraction = _check_fraction("val_fraction", val_fraction, high_open=True)
    test_fraction = _check_fraction("test_fraction", test_fraction, high_open=True)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    library_log_sd = _check_positive("library_log_sd", library_log_sd, allow_zero=True)
    dispersion = _check_positive("dispersion", dispersion)
    dispersion_log_sd = _check_positive("dispersion_log_sd", dispersion_log_sd, allow_zero=True)
    logit_sd = _check_positive("logit_sd", logit_sd)

    rng_design, rng_latent, rng_decoder, rng_counts, rng_split = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))
    names = [f"pert_{k}" for k in range(n_pert)]
    salient_means = salient_scale * rng_design.standard_normal((n_pert, ls))
    code = np.concatenate([np.full(n_ctrl, -1), np.repeat(np.arange(n_pert), per_pert)])
    n_cells = code.shape[0]
    target = code >= 0
    z_b = rng_latent.standard_normal((n_cells, lb))
    z_s = np.where(target[:, None], salient_means[np.maximum(code, 0)] + rng_latent.standard_normal((n_cells, ls)), 0.0)
    z = np.hstack([z_b, z_s])

    dec = _random_decoder(rng_decoder, lb + ls, n_genes, hidden, n_hidden_layers, decoder, z, logit_sd)
    theta = np.exp(np.log(dispersion) + dispersion_log_sd * rng_decoder.standard_normal(n_genes)).astype(np.float32)
    library = np.exp(np.log(library_size) + library_log_sd * rng_counts.standard_normal(n_cells))
    blocks = []
    for start in range(0, n_cells, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n_cells)
        mean = comparative_proportions(dec, z[start:stop]) * library[start:stop, None]
        counts = _sample_counts(rng_counts, mean, theta if likelihood == "nb" else None)
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
    x = sp.vstack(blocks, format="csr").astype(np.float32)
    x.sort_indices()

    perturbation = np.where(target, np.asarray(names, dtype=object)[np.maximum(code, 0)], CONTROL)
    labels = perturbation.astype(str)
    split = _stratified_train_val(labels, val_fraction + test_fraction, rng_split)
    held = np.flatnonzero(split == "val")
    if test_fraction > 0 and len(held):
        second = _stratified_train_val(labels[held], test_fraction / (val_fraction + test_fraction), rng_split)
        split[held] = np.where(second == "val", "test", "val")
    shifts = np.zeros((n_pert, lb + ls), dtype=np.float32)
    shifts[:, lb:] = salient_means
    targets = np.zeros((n_pert, lb + ls), dtype=np.int8)
    targets[:, lb:] = 1
    ground_truth: dict[str, Any] = {
        "simulator": "comparative",
        "params": params,
        "perturbations": names,
        "targets": targets,
        "shifts": shifts,
        "salient_means": salient_means.astype(np.float32),
        "blocks": {"background": np.array([0, lb], dtype=np.int64), "salient": np.array([lb, lb + ls], dtype=np.int64)},
        "decoder": dec,
        "library_size": library_size,
    }
    if likelihood == "nb":
        ground_truth["theta"] = theta
    obs = pd.DataFrame({"perturbation": pd.Categorical(perturbation.astype(str)), "split": _as_categorical(split)},
                       index=pd.Index(_names("cell_", n_cells, 5)))
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(_names("gene_", n_genes, 3))))
    for key, value in {"z_true": z, "z_background_true": z_b, "z_salient_true": z_s}.items():
        adata.obsm[key] = np.ascontiguousarray(value, dtype=np.float32)
    adata.uns["ground_truth"] = ground_truth
    adata.uns["simulator"] = "comparative"
    return adata


__all__ = ["DECODERS", "comparative", "comparative_proportions"]
