"""Evaluation metrics shared by every model in the zoo.

Pure numpy / scipy / scikit-learn: no torch import. Inputs may be numpy arrays, lists, or
anything with ``.detach().cpu().numpy()`` (a torch tensor), which is converted first.

Contents (definitions in ``docs/evaluation.md``):

- latent recovery: :func:`match_latents`, :func:`mcc`, :func:`linear_r2`;
- sparse targets: :func:`target_identification`;
- treatment effects: :func:`ate_metrics`, :func:`group_r2`, :func:`de_genes`;
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
