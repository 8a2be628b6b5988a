"""Evaluation metrics shared by every model in the zoo.

Pure numpy / scipy / scikit-learn: no torch import. Inputs may be numpy arrays, lists, or
anything with ``.detach().cpu().numpy()`` (a torch tensor), which is converted first.

Contents (definitions in ``docs/evaluation.md``):

- latent recovery: :func:`match_latents`, :func:`mcc`, :func:`linear_r2`;
- sparse targets: :func:`target_identification`;
- treatment effects: :func:`ate_metrics`, :func:`group_r2`, :func:`de_genes`;
- perturbation prediction, with the definitions of the ``cell-eval`` package (Arc
  Institute): :func:`pseudobulk_delta`, :func:`pearson_delta`, :func:`mse`, :func:`mae`,
  :func:`de_overlap`, :func:`de_direction_agreement`, :func:`discrimination_score`, and
  all of them at once, :func:`perturbation_metrics`;
- clustering and independence of latent blocks: :func:`clustering_scores`, :func:`dhsic`;
- held-out likelihood summary: :func:`iwelbo_summary`.

All functions are deterministic: where randomness enters (KMeans, dHSIC subsampling and
permutations) it is drawn from an explicit ``seed``. Shape mismatches and non-finite
inputs raise ``ValueError`` naming the argument and its shape.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata
from sklearn.cluster import KMeans
from sklearn.linear_model import LinearRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, r2_score

__all__ = [
    "match_latents",
    "mcc",
    "linear_r2",
    "target_identification",
    "ate_metrics",
    "group_r2",
    "de_genes",
    "pseudobulk_delta",
    "pearson_delta",
    "mse",
    "mae",
    "de_overlap",
    "de_direction_agreement",
    "discrimination_score",
    "perturbation_metrics",
    "clustering_scores",
    "dhsic",
    "iwelbo_summary",
]

_CORR_METHODS = ("pearson", "spearman")


# ----------------------------------------------------------------------------- helpers


def _to_numpy(x: Any, name: str, dtype: Any = float) -> np.ndarray:
    """Convert ``x`` (array-like or torch tensor) to a numpy array of ``dtype``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} could not be converted to a numeric array: {err}") from None
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} (shape {arr.shape}) contains {n_bad} NaN or infinite values")


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A finite float matrix (n, p); a 1-D input of length n becomes (n, 1)."""
    arr = _to_numpy(x, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (cells x dims), got shape {arr.shape}")
    _check_finite(arr, name)
    return arr


def _same_rows(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} has shape {a.shape} and {b_name} has shape {b.shape}: "
            "they must have the same number of rows (cells)"
        )


def _standardise_columns(z: np.ndarray) -> np.ndarray:
    """Centre each column and scale it to unit norm; constant columns become all zeros."""
    zc = z - z.mean(axis=0, keepdims=True)
    norms = np.sqrt(np.sum(zc * zc, axis=0))
    # relative threshold: a column whose spread is at rounding level is treated as constant
    scale = np.abs(z).max(axis=0, initial=0.0)
    const = norms <= 1e-10 * scale * np.sqrt(max(z.shape[0], 1))
    safe = np.where(const, 1.0, norms)
    out = zc / safe
    out[:, const] = 0.0
    return out


def _abs_corr_matrix(z_true: np.ndarray, z_hat: np.ndarray, method: str) -> np.ndarray:
    """|corr| between every column of z_true (n, K) and of z_hat (n, L): shape (K, L)."""
    if method == "spearman":
        z_true = rankdata(z_true, axis=0)
        z_hat = rankdata(z_hat, axis=0)
    a = _standardise_columns(z_true)
    b = _standardise_columns(z_hat)
    corr = np.abs(a.T @ b)
    return np.clip(corr, 0.0, 1.0)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two 1-D vectors of the same length (>= 2); 0.0 if either is constant."""
    sa = _standardise_columns(a[:, None])[:, 0]
    sb = _standardise_columns(b[:, None])[:, 0]
    return float(np.clip(sa @ sb, -1.0, 1.0))


def _top_abs_indices(values: np.ndarray, top_n: int) -> np.ndarray:
    """Indices of the ``top_n`` largest |values| along the last axis, largest first.

    Ties are broken by the lower index (stable sort), so the result is deterministic.
    ``top_n`` larger than the axis length returns every index.
    """
    order = np.argsort(-np.abs(values), axis=-1, kind="stable")
    return order[..., : min(top_n, values.shape[-1])]


def _check_positive_int(value: Any, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


# ----------------------------------------------------------------------- latent recovery


def match_latents(
    z_true: Any, z_hat: Any, method: str = "pearson"
) -> tuple[np.ndarray, np.ndarray]:
    """Match each true latent to one inferred latent, one-to-one, by |correlation|.

    Builds the absolute correlation matrix (Pearson, or Spearman: Pearson on column
    ranks) between true and inferred latents and solves the assignment that maximises
    the summed |correlation| (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).

    Args:
        z_true: true latents, shape (n, K) (a 1-D array is one latent, (n, 1)).
        z_hat: inferred latents, shape (n, L). L > K (extra latents) and L < K are both
            allowed; only ``min(K, L)`` true latents can then be matched.
        method: ``"pearson"`` or ``"spearman"``.

    Returns:
        ``(matched_hat_index, matched_abs_corr)``, both of shape (K,), indexed by true
        latent: ``matched_hat_index[k]`` is the column of ``z_hat`` matched to true latent
        ``k`` (``-1`` if unmatched, possible only when L < K), ``matched_abs_corr[k]`` its
        absolute correlation in [0, 1] (``0.0`` when unmatched). A constant column (in
        either input) has correlation 0 with everything, never NaN.

    Raises:
        ValueError: unknown method, non-finite values, fewer than 2 rows, or different
            numbers of rows.
    """
    if method not in _CORR_METHODS:
        raise ValueError(f"method must be one of {_CORR_METHODS}, got {method!r}")
    zt = _as_matrix(z_true, "z_true")
    zh = _as_matrix(z_hat, "z_hat")
    _same_rows(zt, "z_true", zh, "z_hat")
    if zt.shape[0] < 2:
        raise ValueError(f"need at least 2 cells to correlate latents, got z_true shape {zt.shape}")
    corr = _abs_corr_matrix(zt, zh, method)  # (K, L)
    n_true = zt.shape[1]
    matched_index = np.full(n_true, -1, dtype=np.int64)
    matched_corr = np.zeros(n_true, dtype=float)
    if corr.size:
        rows, cols = linear_sum_assignment(corr, maximize=True)
        matched_index[rows] = cols
        matched_corr[rows] = corr[rows, cols]
    return matched_index, matched_corr


def mcc(z_true: Any, z_hat: Any, method: str = "pearson") -> float:
    """Mean correlation coefficient: mean matched |correlation| over the true latents.

    Uses :func:`match_latents`; true latents left unmatched (when z_hat has fewer columns
    than z_true) count as 0. Shapes: z_true (n, K), z_hat (n, L). Returns a float in [0, 1].
    """
    _, corr = match_latents(z_true, z_hat, method=method)
    return float(corr.mean()) if corr.size else 0.0


def linear_r2(z_true: Any, z_hat: Any) -> float:
    """R^2 of the true latents regressed linearly (with intercept) on the inferred ones.

    Fits one ordinary least-squares regression of z_true (n, K) on z_hat (n, L) and
    returns sklearn's ``r2_score`` averaged uniformly over the K true dimensions. The fit
    is **in-sample** (fitted and scored on the same cells), so with L close to n it is
    optimistic; use many more cells than latents. A constant true column scores 1.0 if
    predicted exactly (it always is, thanks to the intercept).
    """
    zt = _as_matrix(z_true, "z_true")
    zh = _as_matrix(z_hat, "z_hat")
    _same_rows(zt, "z_true", zh, "z_hat")
    if zt.shape[0] < 2:
        raise ValueError(f"need at least 2 cells for R^2, got z_true shape {zt.shape}")
    pred = LinearRegression().fit(zh, zt).predict(zh)
    return float(r2_score(zt, pred, multioutput="uniform_average"))


# ------------------------------------------------------------------- target identification


def target_identification(
    true_targets: Any,
    predicted: Any,
    matching: Any,
    k: int | None = None,
    *,
    scores: bool = False,
) -> dict[str, float]:
    """Precision, recall and F1 of predicted perturbation targets after latent matching.

    Args:
        true_targets: binary target matrix, shape (T, K): entry (t, k) is 1 when
            perturbation t shifts true latent k (entries > 0.5 count as targets).
        predicted: shape (T, L), in the inferred latent space. With ``scores=False``
            a binary or probability mask (e.g. ``sigmoid(alpha)``); entries > 0.5 are called
            targets. With ``scores=True`` magnitudes (e.g. |shift|; the absolute value is
            taken): in each row the top-k entries are called targets, where k is that row's
            number of true targets (``k=None``) or the given ``k`` (clipped to L). Ties are
            broken by the lower column index.
        matching: shape (K,), the first output of :func:`match_latents`: the predicted
            column for true latent k is ``predicted[:, matching[k]]``; ``-1`` means unmatched.
        k: targets called per row in scores mode; ignored otherwise.
        scores: treat ``predicted`` as magnitudes and call the top-k per row.

    Targets are counted over the whole (T, L) prediction: a target called on an inferred
    latent matched to no true latent is a false positive, and a true target on an
    unmatched true latent is a false negative.

    Returns:
        dict with floats ``precision``, ``recall``, ``f1`` (each 0.0 when its denominator is
        0, without warnings) and integer counts ``tp``, ``fp``, ``fn``.
    """
    truth = _to_numpy(true_targets, "true_targets")
    pred = _to_numpy(predicted, "predicted")
    match = _to_numpy(matching, "matching", dtype=float)
    if truth.ndim != 2:
        raise ValueError(f"true_targets must be 2-D (treatments x true latents), got shape {truth.shape}")
    if pred.ndim != 2:
        raise ValueError(f"predicted must be 2-D (treatments x inferred latents), got shape {pred.shape}")
    _check_finite(truth, "true_targets")
    _check_finite(pred, "predicted")
    if truth.shape[0] != pred.shape[0]:
        raise ValueError(
            f"true_targets has shape {truth.shape} and predicted has shape {pred.shape}: "
            "they must have the same number of rows (treatments)"
        )
    n_true_latents, n_hat_latents = truth.shape[1], pred.shape[1]
    if match.shape != (n_true_latents,):
        raise ValueError(
            f"matching has shape {match.shape} but true_targets has shape {truth.shape}: "
            f"matching needs one entry per true latent, shape ({n_true_latents},)"
        )
    _check_finite(match, "matching")
    if np.any(match != np.round(match)):
        raise ValueError("matching must contain integer column indices (or -1)")
    match = match.astype(np.int64)
    if np.any((match < -1) | (match >= n_hat_latents)):
        raise ValueError(
            f"matching entries must be -1 or column indices in [0, {n_hat_latents}) of "
            f"predicted with shape {pred.shape}, got {match.tolist()}"
        )
    used = match[match >= 0]
    if np.unique(used).size != used.size:
        raise ValueError(f"matching must be one-to-one, got repeated columns in {match.tolist()}")

    truth_b = truth > 0.5
    if scores:
        mag = np.abs(pred)
        if k is None:
            per_row = truth_b.sum(axis=1)
        else:
            per_row = np.full(pred.shape[0], _check_positive_int(k, "k", allow_zero=True))
        per_row = np.minimum(per_row, n_hat_latents)
        order = np.argsort(-mag, axis=1, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(n_hat_latents)[None, :], axis=1)
        pred_b = ranks < per_row[:, None]
    else:
        pred_b = pred > 0.5

    matched = match >= 0
    tp = int(np.sum(truth_b[:, matched] & pred_b[:, match[matched]]))
    n_pred = int(pred_b.sum())
    n_true = int(truth_b.sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if (precision + recall) > 0 else 0.0
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_true - tp,
    }


# -------------------------------------------------------------------- treatment effects


def _r2_and_pearson(data: np.ndarray, model: np.ndarray) -> tuple[float, float]:
    """(Pearson r, R^2) of two 1-D vectors; (nan, nan) with fewer than 2 entries."""
    if data.size < 2:
        return float("nan"), float("nan")
    return _pearson(data, model), float(r2_score(data, model))


def ate_metrics(ate_data: Any, ate_model: Any, top_n: int = 20) -> dict[str, float]:
    """Agreement between data and model average treatment effects (ATE).

    Args:
        ate_data: observed ATE, shape (T, G) (treatments x genes); a 1-D (G,) array is one
            treatment.
        ate_model: predicted ATE, same shape.
        top_n: for the restricted metrics, keep in each treatment row the ``top_n`` genes
            with largest |ate_data| (all genes if G <= top_n; ties -> lower gene index).

    Returns:
        dict of floats: ``ate_pearson`` and ``ate_r2`` on the flattened (T * G) arrays
        (R^2 is ``sklearn.metrics.r2_score(data, model)``: data is the reference), and the
        same on the selected genes, keyed ``f"ate_pearson_top{top_n}"`` and
        ``f"ate_r2_top{top_n}"`` (``ate_pearson_top20`` by default). Pearson r is 0.0 when
        either side is constant; R^2 follows sklearn (1.0 for a perfect fit of constant
        data, 0.0 otherwise). With fewer than 2 entries the metrics are NaN (explicitly,
        without warnings); otherwise they are never NaN.
    """
    top_n = _check_positive_int(top_n, "top_n")
    data = _to_numpy(ate_data, "ate_data")
    model = _to_numpy(ate_model, "ate_model")
    if data.ndim == 1:
        data = data[None, :]
    if model.ndim == 1:
        model = model[None, :]
    if data.ndim != 2 or model.ndim != 2 or data.shape != model.shape:
        raise ValueError(
            f"ate_data has shape {data.shape} and ate_model has shape {model.shape}: "
            "both must be (treatments, genes) with the same shape"
        )
    _check_finite(data, "ate_data")
    _check_finite(model, "ate_model")

    r_all, r2_all = _r2_and_pearson(data.ravel(), model.ravel())
    idx = _top_abs_indices(data, top_n)  # (T, min(top_n, G))
    top_data = np.take_along_axis(data, idx, axis=1).ravel()
    top_model = np.take_along_axis(model, idx, axis=1).ravel()
    r_top, r2_top = _r2_and_pearson(top_data, top_model)
    return {
        "ate_pearson": r_all,
        "ate_r2": r2_all,
        f"ate_pearson_top{top_n}": r_top,
        f"ate_r2_top{top_n}": r2_top,
    }


def group_r2(mean_data: Any, mean_model: Any, top_genes: Any = None) -> float:
    """R^2 between a group's observed and predicted mean expression.

    Args:
        mean_data: observed mean expression of the group, shape (G,).
        mean_model: predicted mean expression, shape (G,).
        top_genes: optional integer index array (or boolean mask of shape (G,)) restricting
            both vectors, e.g. the output of :func:`de_genes`.

    Returns:
        ``sklearn.metrics.r2_score(mean_data, mean_model)`` on the (restricted) vectors;
        NaN if fewer than 2 genes remain.
    """
    data = _to_numpy(mean_data, "mean_data")
    model = _to_numpy(mean_model, "mean_model")
    if data.ndim != 1 or data.shape != model.shape:
        raise ValueError(
            f"mean_data has shape {data.shape} and mean_model has shape {model.shape}: "
            "both must be 1-D (genes,) with the same shape"
        )
    _check_finite(data, "mean_data")
    _check_finite(model, "mean_model")
    if top_genes is not None:
        sel = np.asarray(top_genes)
        if sel.dtype == bool:
            if sel.shape != data.shape:
                raise ValueError(
                    f"boolean top_genes has shape {sel.shape} but mean_data has shape {data.shape}"
                )
        elif sel.size and not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"top_genes must be integer indices or a boolean mask, got dtype {sel.dtype}")
        else:
            sel = sel.astype(np.int64).ravel()
            if sel.size and (sel.min() < -data.size or sel.max() >= data.size):
                raise ValueError(
                    f"top_genes indices must lie in [0, {data.size}) for mean_data of shape {data.shape}"
                )
        data, model = data[sel], model[sel]
    if data.size < 2:
        return float("nan")
    return float(r2_score(data, model))


def de_genes(group_mean: Any, control_mean: Any, top_n: int = 20) -> np.ndarray:
    """Indices of the ``top_n`` genes with largest |group_mean - control_mean|.

    Shapes: group_mean (G,), control_mean (G,). Returns an int64 array of
    ``min(top_n, G)`` gene indices, ordered by decreasing |difference| (ties: lower index
    first).
    """
    top_n = _check_positive_int(top_n, "top_n")
    g = _to_numpy(group_mean, "group_mean")
    c = _to_numpy(control_mean, "control_mean")
    if g.ndim != 1 or g.shape != c.shape:
        raise ValueError(
            f"group_mean has shape {g.shape} and control_mean has shape {c.shape}: "
            "both must be 1-D (genes,) with the same shape"
        )
    _check_finite(g, "group_mean")
    _check_finite(c, "control_mean")
    return _top_abs_indices(g - c, top_n).astype(np.int64)


# ------------------------------------------------------------ perturbation prediction
#
# The field's metrics for predicted perturbation responses, as the ``cell-eval`` package
# (Arc Institute, github.com/ArcInstitute/cell-eval, version 0.8) defines them, on
# pseudobulk arrays instead of AnnData and DE tables. Every delta is taken against its
# own side's control: observed perturbation minus observed control, predicted
# perturbation minus predicted control (as cell-eval does; neither side borrows the
# other's control).

_DISTANCES = ("l1", "l2", "cosine")
_TIES = ("average", "min", "max")


def _profile_matrix(x: Any, name: str) -> np.ndarray:
    """A finite float (perturbations, genes) matrix; a 1-D (G,) input is one perturbation."""
    arr = _to_numpy(x, name)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be (perturbations, genes) with both >= 1, got shape {arr.shape}")
    _check_finite(arr, name)
    return arr


def _observed_predicted(observed: Any, predicted: Any, obs_name: str, pred_name: str):
    obs = _profile_matrix(observed, obs_name)
    pred = _profile_matrix(predicted, pred_name)
    if obs.shape != pred.shape:
        raise ValueError(
            f"{obs_name} has shape {obs.shape} and {pred_name} has shape {pred.shape}: "
            "both must be (perturbations, genes) with the same shape"
        )
    return obs, pred


def _gene_mask(mask: Any, name: str, shape: tuple[int, int]) -> np.ndarray | None:
    """None, or a boolean (perturbations, genes) mask (0/1 values accepted)."""
    if mask is None:
        return None
    arr = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape} but the deltas have shape {shape}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{name} must be a boolean (perturbations, genes) mask, got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _de_size(n: Any, n_genes: int, observed_de: np.ndarray | None) -> int | None:
    """Validated ``n`` (None allowed only with a significance mask)."""
    if n is None:
        if observed_de is None:
            raise ValueError(
                "n=None (every significant gene) needs observed_de: without a significance "
                "mask every gene would be 'DE' and the metric would be trivially 1"
            )
        return None
    n = _check_positive_int(n, "n")
    if n > n_genes:
        raise ValueError(f"n={n} exceeds the number of genes ({n_genes}) in the deltas")
    return n


def _ranked_candidates(values: np.ndarray, candidates: np.ndarray | None) -> list[np.ndarray]:
    """Per row, the candidate genes (all if None) by decreasing |value|, ties: lower index."""
    key = -np.abs(values)
    if candidates is not None:
        key = np.where(candidates, key, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    counts = values.shape[1] if candidates is None else candidates.sum(axis=1)
    counts = np.broadcast_to(counts, (values.shape[0],))
    return [order[p, : counts[p]] for p in range(values.shape[0])]


def pseudobulk_delta(profiles: Any, control: Any) -> np.ndarray:
    """Perturbation effects: each pseudobulk profile minus the control profile.

    Args:
        profiles: (P, G) pseudobulk (mean) expression of each perturbation's cells, in the
            space the metrics are computed in (cell-eval: ``normalize_total`` then ``log1p``;
            this project's ATE: log2(1 + counts normalised to 1e4)); a (G,) array is one.
        control: (G,) pseudobulk of the control cells **of the same side**: the observed
            control for observed profiles, the predicted control for predicted ones.

    Returns:
        (P, G) float array ``profiles - control``.
    """
    prof = _profile_matrix(profiles, "profiles")
    ctrl = _to_numpy(control, "control")
    if ctrl.shape != (prof.shape[1],):
        raise ValueError(
            f"control has shape {ctrl.shape} but profiles has shape {prof.shape}: "
            f"control must be one profile of shape ({prof.shape[1]},)"
        )
    _check_finite(ctrl, "control")
    return prof - ctrl[None, :]


def pearson_delta(observed_delta: Any, predicted_delta: Any) -> np.ndarray:
    """Per-perturbation Pearson correlation, over genes, of observed and predicted deltas.

    cell-eval's ``pearson_delta``: for each perturbation, ``scipy.stats.pearsonr`` between
    the predicted delta (predicted pseudobulk minus predicted control) and the observed
    delta (observed pseudobulk minus observed control), across genes; the reported value
    is its mean over perturbations (see :func:`perturbation_metrics`).

    Args:
        observed_delta, predicted_delta: (P, G) deltas (see :func:`pseudobulk_delta`).

    Returns:
        (P,) float array in [-1, 1]. NaN (explicitly, without warnings) where either row is
        constant (its spread is at rounding level) or G < 2, where r is undefined (scipy
        returns NaN there too).
    """
    obs, pred = _observed_predicted(observed_delta, predicted_delta, "observed_delta", "predicted_delta")
    if obs.shape[1] < 2:
        return np.full(obs.shape[0], np.nan)
    a = obs - obs.mean(axis=1, keepdims=True)
    b = pred - pred.mean(axis=1, keepdims=True)
    norm_a = np.sqrt(np.sum(a * a, axis=1))
    norm_b = np.sqrt(np.sum(b * b, axis=1))
    # a row whose spread is at rounding level of its values is constant
    root_g = np.sqrt(obs.shape[1])
    const = norm_a <= 1e-10 * np.abs(obs).max(axis=1) * root_g
    const |= norm_b <= 1e-10 * np.abs(pred).max(axis=1) * root_g
    safe = np.where(const, 1.0, norm_a * norm_b)
    r = np.clip(np.sum(a * b, axis=1) / safe, -1.0, 1.0)
    r[const] = np.nan
    return r


def mse(observed: Any, predicted: Any) -> np.ndarray:
    """Per-perturbation mean squared error over genes: ``mean_g (pred - obs)^2``.

    cell-eval computes it twice: ``mse`` on the pseudobulk **profiles** (pass the
    profiles: no control enters) and ``mse_delta`` on the deltas (pass the deltas). Shapes:
    (P, G) each; returns (P,).
    """
    obs, pred = _observed_predicted(observed, predicted, "observed", "predicted")
    return np.mean((pred - obs) ** 2, axis=1)


def mae(observed: Any, predicted: Any) -> np.ndarray:
    """Per-perturbation mean absolute error over genes: ``mean_g |pred - obs|``.

    As :func:`mse`: cell-eval's ``mae`` on profiles, ``mae_delta`` on deltas. Shapes:
    (P, G) each; returns (P,).
    """
    obs, pred = _observed_predicted(observed, predicted, "observed", "predicted")
    return np.mean(np.abs(pred - obs), axis=1)


def de_overlap(
    observed_delta: Any,
    predicted_delta: Any,
    n: int | None = None,
    *,
    observed_de: Any = None,
    predicted_de: Any = None,
) -> np.ndarray:
    """Per-perturbation overlap of the top-``n`` DE genes (cell-eval's ``overlap_at_N``).

    cell-eval's definition: on each side, keep the significant genes (FDR < 0.05 in its
    Wilcoxon DE table) and rank them by decreasing |log2 fold change|; with
    ``k = min(n, number of observed significant genes)`` (``n=None``: all of them, the
    ``overlap_at_N`` of the Virtual Cell Challenge), the score is
    ``|top_k(observed) & top_k(predicted)| / k``, where the predicted list may be shorter
    than k (fewer significant predicted genes). A perturbation with ``k = 0`` scores 0.0.
    It is a recall of the observed top genes; at fixed n it is also a precision.

    Here the ranking is by |``observed_delta``| and |``predicted_delta``| (ties: lower gene
    index first, as cell-eval's ordinal rank). Pass log2 fold changes to reproduce
    cell-eval exactly (pdex computes ``log2(mean expm1(x_pert) / mean expm1(x_ctrl))``);
    deltas of log-expression means rank genes almost the same way. The significance filter
    is optional: ``observed_de`` / ``predicted_de`` are boolean (P, G) masks of the genes
    each side calls DE (e.g. FDR < 0.05); without them every gene is a candidate.

    Args:
        observed_delta, predicted_delta: (P, G) effects (deltas or log fold changes).
        n: number of top genes, 1 <= n <= G; None (all observed DE genes) needs
            ``observed_de``.
        observed_de, predicted_de: optional boolean (P, G) significance masks.

    Returns:
        (P,) float array in [0, 1].

    Raises:
        ValueError: ``n`` larger than the number of genes, ``n=None`` without
            ``observed_de``, or mismatched shapes.
    """
    obs, pred = _observed_predicted(observed_delta, predicted_delta, "observed_delta", "predicted_delta")
    obs_mask = _gene_mask(observed_de, "observed_de", obs.shape)
    pred_mask = _gene_mask(predicted_de, "predicted_de", obs.shape)
    n = _de_size(n, obs.shape[1], obs_mask)
    obs_ranked = _ranked_candidates(obs, obs_mask)
    pred_ranked = _ranked_candidates(pred, pred_mask)
    out = np.zeros(obs.shape[0])
    for p, (obs_genes, pred_genes) in enumerate(zip(obs_ranked, pred_ranked)):
        k = obs_genes.size if n is None else min(n, obs_genes.size)
        if k == 0:
            continue
        out[p] = np.intersect1d(obs_genes[:k], pred_genes[:k]).size / k
    return out


def de_direction_agreement(
    observed_delta: Any,
    predicted_delta: Any,
    n: int | None = None,
    *,
    observed_de: Any = None,
) -> np.ndarray:
    """Per-perturbation share of observed DE genes whose predicted change has the same sign.

    cell-eval's ``de_direction_match``: over the genes significant in the observed DE
    table (FDR < 0.05), the fraction with ``sign(observed log2 FC) == sign(predicted log2
    FC)`` (a predicted change of exactly 0 has sign 0 and so disagrees with any nonzero
    observed change); perturbations without observed DE genes are left out of the mean.

    Here the observed DE genes are those of ``observed_de`` (a boolean (P, G) mask, e.g.
    FDR < 0.05), restricted to the top ``n`` by |observed_delta| when ``n`` is given, or,
    without a mask, the top ``n`` genes by |observed_delta| (ties: lower index).

    Args:
        observed_delta, predicted_delta: (P, G) effects (deltas or log fold changes).
        n: top genes per perturbation, 1 <= n <= G; None (all of ``observed_de``) needs
            ``observed_de``.
        observed_de: optional boolean (P, G) mask of the observed DE genes.

    Returns:
        (P,) float array in [0, 1]; NaN (without warnings) for a perturbation with no
        observed DE gene.
    """
    obs, pred = _observed_predicted(observed_delta, predicted_delta, "observed_delta", "predicted_delta")
    obs_mask = _gene_mask(observed_de, "observed_de", obs.shape)
    n = _de_size(n, obs.shape[1], obs_mask)
    out = np.full(obs.shape[0], np.nan)
    for p, genes in enumerate(_ranked_candidates(obs, obs_mask)):
        genes = genes if n is None else genes[:n]
        if genes.size:
            out[p] = float(np.mean(np.sign(obs[p, genes]) == np.sign(pred[p, genes])))
    return out


def _distances_to_rows(rows: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """Distance from x (G,) to every row of rows (P, G): shape (P,)."""
    if metric == "l1":
        return np.sum(np.abs(rows - x[None, :]), axis=1)
    if metric == "l2":
        return np.sqrt(np.sum((rows - x[None, :]) ** 2, axis=1))
    # cosine distance 1 - cos; a zero vector has similarity 0 (distance 1), as sklearn
    norms = np.sqrt(np.sum(rows * rows, axis=1)) * np.sqrt(np.sum(x * x))
    dots = rows @ x
    sim = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return np.clip(1.0 - sim, 0.0, 2.0)


def discrimination_score(
    observed_delta: Any,
    predicted_delta: Any,
    metric: str = "l1",
    *,
    exclude: Any = None,
    ties: str = "average",
) -> np.ndarray:
    """Per-perturbation discrimination score: how close each prediction is to its own truth.

    cell-eval's ``discrimination_score_{l1,l2,cosine}`` (the Virtual Cell Challenge's
    "perturbation discrimination score"): for perturbation p, compute the distance from
    its predicted delta to the observed delta of every perturbation q (p included), sort
    ascending, and let ``rank`` be the 0-based position of p itself. The score is
    ``1 - rank / P``: 1.0 when the true perturbation is the closest, ``1 / P`` when it is
    the farthest (cell-eval's docstring says 0, its formula gives 1/P), about 0.5 for
    random predictions. Deltas are signed (cell-eval once took |delta|, since fixed).
    cell-eval leaves the target gene (the gene named like the perturbation) out by
    default: pass it in ``exclude``.

    Ties: cell-eval takes the position in ``numpy.argsort``, so among equidistant
    perturbations the order is the array order, which rewards or punishes a degenerate
    prediction (e.g. all-zero deltas under cosine) depending on where p sits. Here
    ``ties="average"`` (default) counts half of the other perturbations at exactly the
    same distance as p before it (the expected rank under a random tie order), ``"min"``
    none (optimistic), ``"max"`` all (pessimistic).

    Args:
        observed_delta, predicted_delta: (P, G) deltas, rows in the same perturbation order.
        metric: ``"l1"`` (sum of |differences|, cell-eval's default and the challenge's),
            ``"l2"`` (Euclidean) or ``"cosine"`` (1 - cosine similarity).
        exclude: optional boolean (P, G) mask: ``exclude[p, g]`` leaves gene g out of every
            distance used to score perturbation p (e.g. p's own target gene).
        ties: ``"average"``, ``"min"`` or ``"max"`` (see above).

    Returns:
        (P,) float array in [1/P, 1].
    """
    if metric not in _DISTANCES:
        raise ValueError(f"metric must be one of {_DISTANCES}, got {metric!r}")
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    obs, pred = _observed_predicted(observed_delta, predicted_delta, "observed_delta", "predicted_delta")
    excluded = _gene_mask(exclude, "exclude", obs.shape)
    n_pert = obs.shape[0]
    if excluded is not None and np.any(excluded.all(axis=1)):
        bad = np.flatnonzero(excluded.all(axis=1)).tolist()
        raise ValueError(f"exclude leaves no gene for perturbation rows {bad}")
    out = np.empty(n_pert)
    for p in range(n_pert):
        keep = slice(None) if excluded is None else ~excluded[p]
        dist = _distances_to_rows(obs[:, keep], pred[p, keep], metric)
        closer = np.sum(dist < dist[p])
        tied_others = np.sum(dist == dist[p]) - 1
        if ties == "average":
            rank = closer + 0.5 * tied_others
        elif ties == "min":
            rank = closer
        else:
            rank = closer + tied_others
        out[p] = 1.0 - rank / n_pert
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; NaN (without warnings) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def perturbation_metrics(
    observed_delta: Any,
    predicted_delta: Any,
    *,
    observed_control: Any = None,
    predicted_control: Any = None,
    n_de: Sequence[int] = (20,),
    observed_de: Any = None,
    predicted_de: Any = None,
    distance: str = "l1",
    exclude: Any = None,
    per_perturbation: bool = False,
) -> dict[str, Any]:
    """cell-eval's perturbation-prediction metrics, averaged over perturbations.

    Args:
        observed_delta: (P, G) observed pseudobulk minus observed control.
        predicted_delta: (P, G) predicted pseudobulk minus **predicted** control (each
            side against its own control; see :func:`pseudobulk_delta`).
        observed_control, predicted_control: optional (G,) control profiles (both or
            neither): with them the profiles ``delta + control`` give cell-eval's ``mse``
            and ``mae`` on pseudobulk profiles.
        n_de: the n of ``overlap_at_{n}`` and ``de_direction_match_at_{n}`` (each
            1 <= n <= G). cell-eval reports 50, 100, 200, 500 over ~18,000 genes; over a
            few hundred genes smaller n are the comparable choice.
        observed_de, predicted_de: optional boolean (P, G) DE masks (e.g. FDR < 0.05),
            used by every DE metric; with ``observed_de`` also ``overlap_at_N`` and
            ``de_direction_match`` over all observed DE genes.
        distance: metric of the discrimination score (``"l1"``, ``"l2"``, ``"cosine"``).
        exclude: optional boolean (P, G) genes left out of the discrimination score.
        per_perturbation: also return every metric per perturbation.

    Returns:
        dict of floats: ``pearson_delta``, ``mse_delta``, ``mae_delta``, ``mse`` and
        ``mae`` (with the controls), ``overlap_at_{n}`` and ``de_direction_match_at_{n}``
        for each n (and ``overlap_at_N``, ``de_direction_match`` with ``observed_de``),
        ``discrimination_score_{distance}``, each the mean over perturbations of the
        per-perturbation values of the functions above; NaN values (a constant delta's
        Pearson r, a perturbation without observed DE genes) are left out of the mean,
        and ``pearson_delta_undefined`` counts the perturbations whose r is NaN.
        ``n_perturbations`` (int). With ``per_perturbation``, ``"per_perturbation"``
        maps each metric name to its (P,) array.
    """
    obs, pred = _observed_predicted(observed_delta, predicted_delta, "observed_delta", "predicted_delta")
    if (observed_control is None) != (predicted_control is None):
        raise ValueError("pass both observed_control and predicted_control, or neither")
    if isinstance(n_de, (int, np.integer)):
        n_de = (n_de,)
    per: dict[str, np.ndarray] = {}
    per["pearson_delta"] = pearson_delta(obs, pred)
    per["mse_delta"] = mse(obs, pred)
    per["mae_delta"] = mae(obs, pred)
    if observed_control is not None:
        obs_ctrl = _to_numpy(observed_control, "observed_control")
        pred_ctrl = _to_numpy(predicted_control, "predicted_control")
        for ctrl, name in ((obs_ctrl, "observed_control"), (pred_ctrl, "predicted_control")):
            if ctrl.shape != (obs.shape[1],):
                raise ValueError(f"{name} has shape {ctrl.shape}, expected ({obs.shape[1]},) (one per gene)")
            _check_finite(ctrl, name)
        per["mse"] = mse(obs + obs_ctrl, pred + pred_ctrl)
        per["mae"] = mae(obs + obs_ctrl, pred + pred_ctrl)
    de_sizes: list[int | None] = list(n_de)
    if observed_de is not None:
        de_sizes.append(None)
    for n in de_sizes:
        label = "N" if n is None else str(n)
        per[f"overlap_at_{label}"] = de_overlap(
            obs, pred, n, observed_de=observed_de, predicted_de=predicted_de
        )
        direction_key = "de_direction_match" if n is None else f"de_direction_match_at_{n}"
        per[direction_key] = de_direction_agreement(obs, pred, n, observed_de=observed_de)
    per[f"discrimination_score_{distance}"] = discrimination_score(obs, pred, distance, exclude=exclude)

    result: dict[str, Any] = {name: _nanmean(values) for name, values in per.items()}
    result["pearson_delta_undefined"] = int(np.sum(np.isnan(per["pearson_delta"])))
    result["n_perturbations"] = int(obs.shape[0])
    if per_perturbation:
        result["per_perturbation"] = per
    return result


# ---------------------------------------------------------------- clustering and dHSIC


def clustering_scores(
    latent: Any, labels: Any, n_clusters: int | None = None, seed: int = 0
) -> dict[str, float]:
    """How well KMeans clusters of a latent recover known labels.

    Runs ``KMeans(n_clusters, n_init=10, random_state=seed)`` on ``latent`` (n, d) (a 1-D
    array is (n, 1)) and compares the clusters with ``labels`` (n,) (any hashable values,
    e.g. strings; to score a product of two labelings, pass combined labels such as
    ``cov + "|" + treat``). ``n_clusters`` defaults to the number of distinct labels.
    The latent is used as given (not standardised).

    Returns:
        dict with floats ``nmi`` (``normalized_mutual_info_score``) and ``ari``
        (``adjusted_rand_score``).
    """
    z = _as_matrix(latent, "latent")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != z.shape[0]:
        raise ValueError(
            f"latent has shape {z.shape} and labels has shape {lab.shape}: labels must be "
            "1-D with one entry per row of latent"
        )
    _, codes = np.unique(lab, return_inverse=True)
    if n_clusters is None:
        n_clusters = int(codes.max()) + 1 if codes.size else 0
    n_clusters = _check_positive_int(n_clusters, "n_clusters")
    if n_clusters > z.shape[0]:
        raise ValueError(f"n_clusters={n_clusters} exceeds the number of cells in latent of shape {z.shape}")
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    pred = km.fit_predict(z)
    return {
        "nmi": float(normalized_mutual_info_score(codes, pred)),
        "ari": float(adjusted_rand_score(codes, pred)),
    }


def _gaussian_gram(x: np.ndarray) -> np.ndarray:
    """Gaussian kernel matrix (n, n) with the median-heuristic bandwidth.

    k(a, b) = exp(-||a - b||^2 / (2 sigma^2)) with sigma^2 = median_{i<j} ||x_i - x_j||^2 / 2,
    i.e. exp(-d^2 / median(d^2)). If the median is 0 (ties), the mean of the positive
    squared distances is used; a constant block gives the all-ones matrix.
    """
    sq = np.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    off = d2[np.triu_indices(x.shape[0], k=1)]
    med = float(np.median(off)) if off.size else 0.0
    if med <= 0.0:
        pos = off[off > 0.0]
        med = float(pos.mean()) if pos.size else 1.0
    return np.exp(-d2 / med)


def _dhsic_from_grams(
    grams: Sequence[np.ndarray],
    rowmeans: Sequence[np.ndarray],
    term2: float,
    perms: Sequence[np.ndarray] | None = None,
) -> tuple[float, float]:
    """dHSIC V-statistic from Gram matrices, the blocks j >= 1 permuted by ``perms``.

    ``rowmeans[j]`` is ``grams[j].mean(axis=1)``; permuting a block permutes its row means,
    so only the first term needs the permuted (n, n) matrices. Returns
    ``(statistic, magnitude)``, ``magnitude`` being the size of the three terms whose
    difference is the statistic (the scale of its rounding error).
    """
    n = grams[0].shape[0]
    others = list(grams[1:])
    rowprod = rowmeans[0].copy()
    for j, rm in enumerate(rowmeans[1:]):
        if perms is not None:
            p = perms[j]
            # one row gather then one column gather: faster than fancy 2-D indexing
            others[j] = np.take(others[j][p], p, axis=1)
            rm = rm[p]
        rowprod *= rm
    if len(others) == 1:
        term1 = float(np.vdot(grams[0], others[0])) / n**2
    else:
        prod = grams[0] * others[0]
        for gram in others[1:]:
            prod *= gram
        term1 = float(prod.mean())
    term3 = 2.0 * float(rowprod.mean())
    return term1 + term2 - term3, term1 + term2 + term3


def dhsic(
    blocks: Sequence[Any],
    n_permutations: int = 200,
    seed: int = 0,
    max_cells: int | None = 1000,
) -> tuple[float, float]:
    """d-variable Hilbert-Schmidt independence criterion and its permutation p-value.

    The V-statistic of Pfister, Buehlmann, Schoelkopf & Peters (JRSS-B 2018) for joint
    independence of d >= 2 blocks, with Gram matrices K_j (Gaussian kernel, median-heuristic
    bandwidth per block, see :func:`_gaussian_gram`)::

        dHSIC = mean_{a,b} prod_j K_j[a,b] + prod_j mean_{a,b} K_j[a,b]
                - 2 mean_a prod_j mean_b K_j[a,b]

    It is the squared MMD between the empirical joint distribution and the product of the
    empirical marginals, hence >= 0 (values within rounding error of 0 are returned as 0).

    Args:
        blocks: d >= 2 arrays with the same number of rows n, block j of shape (n, p_j)
            (1-D arrays are (n, 1)); each row is one cell. Blocks are not standardised.
        n_permutations: permutations for the p-value; each permutes the rows of every
            block but the first, independently. With 0 the p-value is NaN.
        seed: seeds both the subsampling and the permutations.
        max_cells: if n exceeds it, a random subset of ``max_cells`` rows (shared by all
            blocks) is used. ``None`` uses every row; memory and time grow as n^2 per block.

    Returns:
        ``(statistic, p_value)`` with ``p_value = (1 + #{perm stat >= stat}) /
        (1 + n_permutations)``, so never below ``1 / (1 + n_permutations)``.
    """
    if isinstance(blocks, np.ndarray) or len(blocks) < 2:
        raise ValueError("blocks must be a list of at least 2 arrays (one per latent block)")
    n_permutations = _check_positive_int(n_permutations, "n_permutations", allow_zero=True)
    mats = [_as_matrix(b, f"blocks[{j}]") for j, b in enumerate(blocks)]
    n = mats[0].shape[0]
    for j, m in enumerate(mats[1:], start=1):
        if m.shape[0] != n:
            shapes = ", ".join(str(mm.shape) for mm in mats)
            raise ValueError(
                f"blocks[0] has shape {mats[0].shape} and blocks[{j}] has shape {m.shape}: "
                f"all blocks need the same number of rows (shapes: {shapes})"
            )
    if n < 2:
        raise ValueError(f"dHSIC needs at least 2 rows, got blocks[0] of shape {mats[0].shape}")
    rng = np.random.default_rng(seed)
    if max_cells is not None:
        max_cells = _check_positive_int(max_cells, "max_cells")
        if max_cells < 2:
            raise ValueError(f"max_cells must be >= 2, got {max_cells}")
        if n > max_cells:
            keep = np.sort(rng.choice(n, size=max_cells, replace=False))
            mats = [m[keep] for m in mats]
            n = max_cells

    grams = [_gaussian_gram(m) for m in mats]
    rowmeans = [g.mean(axis=1) for g in grams]
    term2 = float(np.prod([rm.mean() for rm in rowmeans]))  # invariant under permutations
    stat, magnitude = _dhsic_from_grams(grams, rowmeans, term2)
    # values within rounding error of 0 are 0, and rounding-level ties count as ">="
    tol = 1e-10 * magnitude
    stat = stat if stat > tol else 0.0
    if n_permutations == 0:
        return stat, float("nan")
    n_ge = 0
    for _ in range(n_permutations):
        perms = [rng.permutation(n) for _ in grams[1:]]
        perm_stat, _ = _dhsic_from_grams(grams, rowmeans, term2, perms)
        n_ge += perm_stat >= stat - tol
    return stat, float((1 + n_ge) / (1 + n_permutations))


# ------------------------------------------------------------------------------- IWELBO


def iwelbo_summary(per_cell: Any) -> dict[str, float]:
    """Mean and standard error of per-cell IWELBO (or ELBO) values.

    Args:
        per_cell: shape (n,), one value per held-out cell.

    Returns:
        dict with ``mean``, ``sem`` (sample std with ddof=1 over sqrt(n); NaN when n < 2)
        and ``n``.
    """
    v = _to_numpy(per_cell, "per_cell").ravel()
    if v.size == 0:
        raise ValueError("per_cell is empty")
    _check_finite(v, "per_cell")
    sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return {"mean": float(v.mean()), "sem": sem, "n": int(v.size)}
