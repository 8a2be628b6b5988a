"""Seeded train / val / test splits for perturbation data.

Three helpers:

- :func:`random_split`: a plain random split of ``n_cells`` cells with exact counts.
- :func:`heldout_perturbation_split`: every cell of the listed perturbation labels goes to
  ``"test"`` (out-of-distribution perturbations, as in the sVAE benchmark).
- :func:`combinatorial_split`: the Norman-style combinatorial task of the SAMS-VAE paper:
  a held-out set of combinations forms the test set, and only a fraction of the other
  combinations is kept for training.

and a guard, :func:`hold_out_controls`: a split that keeps every control cell in training
gets a fraction of them moved to ``"test"``, so that held-out effects can be measured
against controls the model (and the baselines) never saw.

All of them are deterministic given ``seed`` and never modify their input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import anndata as ad
import numpy as np
import pandas as pd

__all__ = [
    "SPLITS",
    "random_split",
    "heldout_perturbation_split",
    "combinatorial_split",
    "hold_out_controls",
    "HELDOUT_CONTROL_FRACTION",
]

#: default fraction of the control cells :func:`hold_out_controls` moves to "test"
HELDOUT_CONTROL_FRACTION = 0.2

#: The split names, in the order used for the categorical ``obs["split"]`` column.
SPLITS: tuple[str, str, str] = ("train", "val", "test")


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even (round(2.5) == 2), which makes counts jump
    # in surprising ways; half-up is what people expect from "round".
    return int(math.floor(x + 0.5))


def _largest_remainder(n: int, fractions: Sequence[float]) -> np.ndarray:
    """Integer counts proportional to ``fractions`` that sum exactly to ``n``.

    Each count is ``floor(f * n)``; the leftover cells go, one each, to the entries with
    the largest fractional parts (ties to the earlier entry), so the counts are the
    closest integers to ``f * n`` that still add up to ``n``.
    """
    exact = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(exact).astype(np.int64)
    leftover = n - int(counts.sum())
    if leftover > 0:
        # stable sort on the negated remainders: ties keep the order train, val, test
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:leftover]] += 1
    return counts


def _check_fraction(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """Validate a fraction in [0, 1] (ends optionally open) and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    low_ok = value > 0.0 if low_open else value >= 0.0
    high_ok = value < 1.0 if high_open else value <= 1.0
    if not (math.isfinite(value) and low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value


def _labels(adata: ad.AnnData, key: str) -> np.ndarray:
    """The ``obs[key]`` column as an array of str, with a clear error if it is missing."""
    if key not in adata.obs.columns:
        raise ValueError(
            f"obs column {key!r} not found; available columns: {list(adata.obs.columns)}"
        )
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(f"obs column {key!r} has missing values")
    return column.astype(str).to_numpy()


def _as_categorical(split: np.ndarray) -> pd.Categorical:
    """The split array as a categorical with the fixed categories train, val, test."""
    return pd.Categorical(np.asarray(split, dtype=object), categories=list(SPLITS))


def _stratified_train_val(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Assign "train" / "val" to cells, per label.

    Args:
        labels: (n_cells,) str labels (perturbations or groups).
        val_fraction: fraction of each label's cells sent to "val" (rounded half up).
        rng: source of randomness; exactly ``n_cells`` uniforms are drawn from it.

    Returns:
        (n_cells,) array of "train" / "val".

    Stratifying by label keeps every perturbation represented in both parts. One random
    key is drawn per cell *before* anything else happens, so a cell's assignment depends
    only on the keys of the cells sharing its label: dropping other labels' cells (as
    :func:`combinatorial_split` does for different fractions) leaves it unchanged.
    """
    n = labels.shape[0]
    keys = rng.random(n)
    split = np.full(n, "train", dtype="<U5")
    if n == 0 or val_fraction == 0.0:
        return split
    # group cells by label: codes from np.unique are deterministic (sorted labels)
    _, codes = np.unique(labels, return_inverse=True)
    # sort by (label, key): within each label, cells in random order
    order = np.lexsort((keys, codes))
    sorted_codes = codes[order]
    boundaries = np.flatnonzero(np.diff(sorted_codes)) + 1
    for block in np.split(order, boundaries):
        n_val = _round_half_up(val_fraction * block.shape[0])
        split[block[:n_val]] = "val"
    return split


def random_split(
    n_cells: int,
    fractions: Sequence[float] = (0.64, 0.16, 0.20),
    seed: int = 0,
) -> np.ndarray:
    """A seeded random train / val / test assignment with exact counts.

    Args:
        n_cells: number of cells (>= 0).
        fractions: (train, val, test) fractions, non-negative and summing to 1.
        seed: random seed.

    Returns:
        (n_cells,) array of str, each "train", "val" or "test". The counts are the
        largest-remainder rounding of ``fractions * n_cells``: each within 1 of the exact
        value and summing to ``n_cells``.

    Raises:
        ValueError: ``n_cells`` negative or not an integer, ``fractions`` not three
            non-negative numbers summing to 1.
    """
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells < 0:
        raise ValueError(f"n_cells must be a non-negative integer, got {n_cells!r}")
    fractions = tuple(fractions)
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {fractions!r}")
    for name, f in zip(SPLITS, fractions):
        _check_fraction(f"fractions[{name!r}]", f)
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fractions)})")
    counts = _largest_remainder(int(n_cells), fractions)
    labels = np.repeat(np.array(SPLITS, dtype="<U5"), counts)
    rng = np.random.default_rng(seed)
    return labels[rng.permutation(int(n_cells))]


def heldout_perturbation_split(
    adata: ad.AnnData,
    heldout: Iterable[str],
    perturbation_key: str = "perturbation",
    val_fraction: float = 0.2,
    seed: int = 0,
    split_key: str = "split",
) -> ad.AnnData:
    """Hold out whole perturbations: their cells form the test set.

    Args:
        adata: AnnData with an ``obs[perturbation_key]`` column (n_cells rows).
        heldout: the labels whose cells all go to "test" (a single str is one label).
        perturbation_key: obs column holding the labels.
        val_fraction: fraction of each remaining label's cells sent to "val" (the rest
            "train"), rounded half up per label.
        seed: random seed for the train / val assignment.
        split_key: obs column to write.

    Returns:
        A copy of ``adata`` (same n_cells) whose ``obs[split_key]`` is a categorical with
        categories train, val, test.

    Raises:
        ValueError: missing column, a listed label absent from the column (all such
            labels are named), ``val_fraction`` outside [0, 1).
    """
    labels = _labels(adata, perturbation_key)
    if isinstance(heldout, str):
        # a bare string would otherwise be iterated character by character
        heldout = [heldout]
    heldout = [str(h) for h in heldout]
    val_fraction = _check_fraction("val_fraction", val_fraction, high_open=True)
    present = set(np.unique(labels).tolist())
    missing = sorted(set(heldout) - present)
    if missing:
        raise ValueError(
            f"held-out labels not found in obs[{perturbation_key!r}]: {missing}"
        )
    rng = np.random.default_rng(seed)
    split = _stratified_train_val(labels, val_fraction, rng)
    split[np.isin(labels, heldout)] = "test"
    out = adata.copy()
    out.obs[split_key] = _as_categorical(split)
    return out


def combinatorial_split(
    adata: ad.AnnData,
    frac_combinations_train: float,
    perturbation_key: str = "perturbation",
    separator: str = "+",
    test_fraction: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
    split_key: str = "split",
) -> ad.AnnData:
    """Norman-style out-of-distribution split for combinations (SAMS-VAE paper).

    The combination labels (those containing ``separator``) are put in a random order
    fixed by ``seed``. The first ``round(test_fraction * n_combinations)`` of them (at
    least one) are held out: all their cells are "test". Of the remaining combinations,
    the first ``round(frac_combinations_train * n_remaining)`` in that same order are kept
    for training; the cells of the others are dropped. The test set therefore holds only
    combinations never seen in training, it does not depend on
    ``frac_combinations_train``, and the training combinations are nested (those kept at
    0.25 are also kept at 0.5, 0.75 and 1). Singles, controls and kept combinations are
    split train / val per label, and a cell's assignment is the same for every fraction.

    Args:
        adata: AnnData with an ``obs[perturbation_key]`` column (n_cells rows).
        frac_combinations_train: fraction in [0, 1] of the non-test combinations kept.
        perturbation_key: obs column holding the labels.
        separator: the string joining the singles of a combination ("A+B").
        test_fraction: fraction in (0, 1] of the combinations held out as test.
        val_fraction: fraction in [0, 1) of each training label's cells sent to "val".
        seed: random seed (held-out combinations and train / val assignment).
        split_key: obs column to write.

    Returns:
        A copy of ``adata`` restricted to the kept cells (n_kept <= n_cells), with
        ``obs[split_key]`` categorical (train, val, test), unused categories of
        ``obs[perturbation_key]`` removed, and ``uns["split_info"]`` =
        {"test_combinations", "train_combinations", "dropped_combinations": sorted lists
        of labels, "frac_combinations_train", "test_fraction", "val_fraction": float,
        "seed": int}.

    Raises:
        ValueError: missing column, no combination labels, a fraction out of range, an
            empty separator.
    """
    frac = _check_fraction("frac_combinations_train", frac_combinations_train)
    test_fraction = _check_fraction("test_fraction", test_fraction, low_open=True)
    val_fraction = _check_fraction("val_fraction", val_fraction, high_open=True)
    if not isinstance(separator, str) or separator == "":
        raise ValueError(f"separator must be a non-empty string, got {separator!r}")
    labels = _labels(adata, perturbation_key)
    # sorted first, so the held-out set depends on the set of labels, not on cell order
    combos = sorted(label for label in np.unique(labels).tolist() if separator in label)
    if not combos:
        raise ValueError(
            f"no combinations (labels containing {separator!r}) in obs[{perturbation_key!r}]"
        )
    rng = np.random.default_rng(seed)
    ordered = [combos[i] for i in rng.permutation(len(combos))]
    n_test = min(max(_round_half_up(test_fraction * len(combos)), 1), len(combos))
    test, remaining = ordered[:n_test], ordered[n_test:]
    n_train = _round_half_up(frac * len(remaining))
    train, dropped = remaining[:n_train], remaining[n_train:]

    # drawn on all cells, after the permutation: independent of frac_combinations_train
    split = _stratified_train_val(labels, val_fraction, rng)
    split[np.isin(labels, test)] = "test"
    keep = ~np.isin(labels, dropped)

    out = adata[keep].copy()
    out.obs[split_key] = _as_categorical(split[keep])
    if isinstance(out.obs[perturbation_key].dtype, pd.CategoricalDtype):
        # dropped combinations must not linger as categories: a data layer that builds
        # its vocabulary from the categories would otherwise learn labels with no cells
        out.obs[perturbation_key] = out.obs[perturbation_key].cat.remove_unused_categories()
    out.uns["split_info"] = {
        "test_combinations": sorted(test),
        "train_combinations": sorted(train),
        "dropped_combinations": sorted(dropped),
        "frac_combinations_train": frac,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "seed": int(seed),
    }
    return out


def hold_out_controls(
    split: np.ndarray,
    labels: np.ndarray,
    control: str,
    fraction: float = HELDOUT_CONTROL_FRACTION,
    seed: int = 0,
    warn: bool = True,
) -> np.ndarray:
    """Move a seeded fraction of the control cells to "test" when none is held out.

    Effects on held-out cells must be measured against held-out control cells: against the
    training controls, the control's sampling noise is shared by the observed effect and by
    every baseline built on the training cells, which correlates them and flatters the
    baselines. A user's split column often keeps all controls in training; then
    ``round(fraction * n_controls)`` of them (at least 1, leaving at least 1 in training),
    chosen by a permutation seeded by ``seed``, go to "test" ("val" when the split has no
    test cell, so that a split without a test part keeps none), with a ``UserWarning``
    that says how many. The split is returned unchanged when some control cell is already
    in "val" or "test", when no cell of another label is held out (nothing is evaluated
    on held-out cells), when ``fraction`` is 0, or when there are fewer than 2 control
    cells.

    Args:
        split: (n_cells,) "train" / "val" / "test" per cell.
        labels: (n_cells,) each cell's label (the control's is ``control``).
        control: the control label.
        fraction: share of the control cells to hold out, in [0, 1).
        seed: random seed; the chosen cells depend only on it and on the positions of the
            control cells.
        warn: give the warning (False when re-encoding data a model was trained on: the
            same cells were held out, and said so, at training time).

    Returns:
        A new (n_cells,) array of str (the input is not modified).

    Raises:
        ValueError: mismatched lengths or ``fraction`` outside [0, 1).
    """
    fraction = _check_fraction("heldout_control_fraction", fraction, high_open=True)
    split = np.asarray(split).astype(str)
    labels = np.asarray(labels)
    if split.shape != labels.shape or split.ndim != 1:
        raise ValueError(f"split has shape {split.shape} and labels {labels.shape}: both must be (n_cells,)")
    out = split.copy()
    is_control = labels == control
    controls = np.flatnonzero(is_control)
    if fraction == 0.0 or controls.size < 2 or (out[controls] != "train").any():
        return out
    if not ((out != "train") & ~is_control).any():
        return out
    n_out = min(max(_round_half_up(fraction * controls.size), 1), controls.size - 1)
    chosen = np.sort(np.random.default_rng(seed).permutation(controls)[:n_out])
    target = "test" if (out == "test").any() else "val"
    out[chosen] = target
    if warn:
        warnings.warn(
            f"the split puts all {controls.size} control cells ({control!r}) in training; {n_out} of them "
            f"({fraction:.0%}, seeded by seed={seed}) were moved to {target!r} so that held-out effects are "
            "measured against held-out controls. Hold controls out in the split column, or pass "
            "heldout_control_fraction=0 to keep the split as given",
            UserWarning,
            stacklevel=3,
        )
    return out
