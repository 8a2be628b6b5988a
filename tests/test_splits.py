"""Tests of the split helpers in pyro_perturb.data.splits."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_perturb.data.splits import (
    combinatorial_split,
    heldout_perturbation_split,
    hold_out_controls,
    random_split,
)


def _toy(
    n_singles: int = 6,
    n_doubles: int = 8,
    cells: int = 10,
    n_control: int = 30,
    categorical: bool = True,
) -> ad.AnnData:
    """A tiny AnnData with singles s0..s5, some doubles "si+sj" and controls."""
    singles = [f"s{i}" for i in range(n_singles)]
    pairs = [f"s{i}+s{j}" for i in range(n_singles) for j in range(i + 1, n_singles)][:n_doubles]
    labels = ["control"] * n_control + [l for l in singles + pairs for _ in range(cells)]
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(labels) if categorical else labels},
        index=[f"cell_{i}" for i in range(len(labels))],
    )
    x = sp.csr_matrix(np.ones((len(labels), 3), dtype=np.float32))
    return ad.AnnData(X=x, obs=obs)


def _col(adata: ad.AnnData, key: str) -> np.ndarray:
    return adata.obs[key].astype(str).to_numpy()


# ------------------------------------------------------------------------ random_split


@pytest.mark.parametrize("n", [0, 1, 7, 100, 101, 1234])
def test_random_split_counts(n):
    split = random_split(n, seed=0)
    assert split.shape == (n,)
    counts = [(split == s).sum() for s in ("train", "val", "test")]
    assert sum(counts) == n
    for count, frac in zip(counts, (0.64, 0.16, 0.20)):
        assert abs(count - frac * n) < 1.0


def test_random_split_exact_and_deterministic():
    split = random_split(100, (0.5, 0.25, 0.25), seed=1)
    assert [(split == s).sum() for s in ("train", "val", "test")] == [50, 25, 25]
    np.testing.assert_array_equal(split, random_split(100, (0.5, 0.25, 0.25), seed=1))
    assert not np.array_equal(split, random_split(100, (0.5, 0.25, 0.25), seed=2))


@pytest.mark.parametrize(
    "n, fractions",
    [
        (10, (0.5, 0.5)),
        (10, (0.6, 0.3, 0.3)),
        (10, (-0.1, 0.6, 0.5)),
        (-1, (0.64, 0.16, 0.2)),
        (2.5, (0.64, 0.16, 0.2)),
    ],
)
def test_random_split_rejects(n, fractions):
    with pytest.raises(ValueError):
        random_split(n, fractions)


# ------------------------------------------------------------------------ heldout_perturbation_split


def test_heldout_split():
    adata = _toy()
    out = heldout_perturbation_split(adata, ["s1", "s1+s2"], seed=0)
    labels, split = _col(out, "perturbation"), _col(out, "split")
    held = np.isin(labels, ["s1", "s1+s2"])
    assert np.all(split[held] == "test") and not np.any(split[~held] == "test")
    # 20 % of each remaining label in val: controls 6 of 30, singles 2 of 10
    assert (split[labels == "control"] == "val").sum() == 6
    assert (split[labels == "s0"] == "val").sum() == 2
    assert list(out.obs["split"].cat.categories) == ["train", "val", "test"]
    assert "split" not in adata.obs  # the input is untouched
    again = heldout_perturbation_split(adata, ["s1", "s1+s2"], seed=0)
    np.testing.assert_array_equal(split, _col(again, "split"))
    other = heldout_perturbation_split(adata, ["s1", "s1+s2"], seed=5)
    assert not np.array_equal(split, _col(other, "split"))


def test_heldout_split_single_string_and_custom_key():
    adata = _toy(categorical=False)
    adata.obs["drug"] = adata.obs.pop("perturbation")
    out = heldout_perturbation_split(adata, "s0", perturbation_key="drug", split_key="fold", val_fraction=0.0)
    fold = _col(out, "fold")
    assert set(fold[_col(out, "drug") == "s0"]) == {"test"}
    assert set(fold[_col(out, "drug") != "s0"]) == {"train"}


def test_heldout_split_errors():
    adata = _toy()
    with pytest.raises(ValueError, match="nope"):
        heldout_perturbation_split(adata, ["s1", "nope"])
    with pytest.raises(ValueError, match="drug"):
        heldout_perturbation_split(adata, ["s1"], perturbation_key="drug")
    with pytest.raises(ValueError, match="val_fraction"):
        heldout_perturbation_split(adata, ["s1"], val_fraction=1.0)


# ------------------------------------------------------------------------ combinatorial_split


def test_combinatorial_split_test_is_unseen_combinations():
    adata = _toy()
    out = combinatorial_split(adata, 0.5, seed=0)
    info = out.uns["split_info"]
    test, train, dropped = info["test_combinations"], info["train_combinations"], info["dropped_combinations"]
    assert len(test) == 4 and len(train) == 2 and len(dropped) == 2
    assert sorted(test + train + dropped) == sorted(l for l in np.unique(_col(adata, "perturbation")) if "+" in l)
    labels, split = _col(out, "perturbation"), _col(out, "split")
    assert set(labels[split == "test"]) == set(test)
    assert set(labels[split != "test"]) & set(test) == set()
    assert set(labels) & set(dropped) == set()
    assert set(out.obs["perturbation"].cat.categories) == set(labels)  # no stale categories
    # singles and controls all kept, split train / val
    singles = [f"s{i}" for i in range(6)] + ["control"]
    assert np.isin(singles, labels).all()
    assert set(split[np.isin(labels, singles)]) == {"train", "val"}
    assert out.n_obs == adata.n_obs - 2 * 10
    assert info["frac_combinations_train"] == 0.5


def test_combinatorial_split_same_test_for_every_fraction():
    adata = _toy(n_doubles=15)
    outs = {f: combinatorial_split(adata, f, seed=3) for f in (0.0, 0.25, 0.5, 0.75, 1.0)}
    tests = {f: tuple(o.uns["split_info"]["test_combinations"]) for f, o in outs.items()}
    assert len(set(tests.values())) == 1
    trains = [set(o.uns["split_info"]["train_combinations"]) for o in outs.values()]
    assert [len(t) for t in trains] == [0, 2, 4, 5, 7]  # round half up of f * 7 remaining
    for smaller, larger in zip(trains, trains[1:]):
        assert smaller <= larger  # nested training sets
    # a cell's split does not depend on the fraction
    full = outs[1.0]
    full_split = pd.Series(_col(full, "split"), index=full.obs_names)
    for o in outs.values():
        np.testing.assert_array_equal(_col(o, "split"), full_split[o.obs_names].to_numpy())
    # no combination in training at fraction 0
    zero = outs[0.0]
    assert not any("+" in l for l in _col(zero, "perturbation")[_col(zero, "split") != "test"])
    # a different seed holds out different combinations
    assert tuple(combinatorial_split(adata, 0.5, seed=4).uns["split_info"]["test_combinations"]) != tests[0.0]


def test_combinatorial_split_independent_of_cell_order():
    adata = _toy()
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    a = combinatorial_split(adata, 0.5, seed=1).uns["split_info"]
    b = combinatorial_split(adata[perm].copy(), 0.5, seed=1).uns["split_info"]
    assert a["test_combinations"] == b["test_combinations"]
    assert a["train_combinations"] == b["train_combinations"]


def test_combinatorial_split_roundtrip(tmp_path):
    out = combinatorial_split(_toy(), 0.25, seed=0)
    path = tmp_path / "split.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    for key in ("test_combinations", "train_combinations", "dropped_combinations"):
        assert list(back.uns["split_info"][key]) == out.uns["split_info"][key]
    assert back.uns["split_info"]["frac_combinations_train"] == 0.25
    np.testing.assert_array_equal(_col(back, "split"), _col(out, "split"))


def test_combinatorial_split_custom_separator():
    adata = _toy()
    adata.obs["perturbation"] = _col(adata, "perturbation")
    adata.obs["perturbation"] = adata.obs["perturbation"].str.replace("+", "_and_", regex=False)
    out = combinatorial_split(adata, 1.0, separator="_and_", seed=0)
    assert len(out.uns["split_info"]["test_combinations"]) == 4


@pytest.mark.parametrize("frac", [-0.1, 1.5, float("nan"), "half"])
def test_combinatorial_split_rejects_fraction(frac):
    with pytest.raises(ValueError, match="frac_combinations_train"):
        combinatorial_split(_toy(), frac)


def test_combinatorial_split_errors():
    with pytest.raises(ValueError, match="no combinations"):
        combinatorial_split(_toy(n_doubles=0), 0.5)
    with pytest.raises(ValueError, match="drug"):
        combinatorial_split(_toy(), 0.5, perturbation_key="drug")
    with pytest.raises(ValueError, match="test_fraction"):
        combinatorial_split(_toy(), 0.5, test_fraction=0.0)
    with pytest.raises(ValueError, match="separator"):
        combinatorial_split(_toy(), 0.5, separator="")


# ---------------------------------------------------------------- held-out controls


def _control_split(n_control=50, n_other=30):
    labels = np.array(["control"] * n_control + ["A"] * n_other + ["B"] * n_other)
    split = np.array(["train"] * n_control + ["train"] * n_other + ["val"] * 5 + ["test"] * (n_other - 5))
    return split, labels


def test_hold_out_controls_moves_a_seeded_fraction_with_a_warning():
    split, labels = _control_split()
    with pytest.warns(UserWarning, match=r"all 50 control cells .* 10 of them \(20%, seeded by seed=3\) were moved to 'test'"):
        out = hold_out_controls(split, labels, "control", 0.2, seed=3)
    moved = np.flatnonzero(out != split)
    assert len(moved) == 10 and (labels[moved] == "control").all() and (out[moved] == "test").all()
    assert split[0] == "train" and (split[:50] == "train").all()  # the input is not modified
    with pytest.warns(UserWarning):
        again = hold_out_controls(split, labels, "control", 0.2, seed=3)
    np.testing.assert_array_equal(out, again)
    with pytest.warns(UserWarning):
        other = hold_out_controls(split, labels, "control", 0.2, seed=4)
    assert (other != out).any()
    with pytest.warns(UserWarning, match="5 of them"):
        assert (hold_out_controls(split, labels, "control", 0.1, seed=3) == "test").sum() == 25 + 5


def test_hold_out_controls_leaves_honest_or_unevaluated_splits_alone(recwarn):
    split, labels = _control_split()
    np.testing.assert_array_equal(hold_out_controls(split, labels, "control", 0.0), split)
    already = split.copy()
    already[0] = "val"  # a control is already held out
    np.testing.assert_array_equal(hold_out_controls(already, labels, "control"), already)
    all_train = np.full(len(split), "train")  # nothing is evaluated on held-out cells
    np.testing.assert_array_equal(hold_out_controls(all_train, labels, "control"), all_train)
    assert not recwarn.list
    no_test = np.where(split == "test", "val", split)  # held-out cells only in val: controls go to val
    out = hold_out_controls(no_test, labels, "control", 0.2, seed=0, warn=False)
    assert not recwarn.list and (out == "test").sum() == 0 and (out[:50] == "val").sum() == 10
    with pytest.raises(ValueError, match="heldout_control_fraction"):
        hold_out_controls(split, labels, "control", 1.0)
    with pytest.raises(ValueError, match="shape"):
        hold_out_controls(split[:-1], labels, "control")


def test_from_anndata_holds_controls_out_of_a_split_column():
    from pyro_perturb.data import PerturbationData

    split, labels = _control_split(n_control=40, n_other=20)
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        sp.csr_matrix(rng.poisson(3.0, size=(len(labels), 8)).astype(np.float32) + 1),
        obs=pd.DataFrame({"perturbation": labels, "split": split}, index=[f"c{i}" for i in range(len(labels))]),
    )
    with pytest.warns(UserWarning, match="8 of them"):
        data = PerturbationData.from_anndata(adata, seed=1)
    controls = data.label_names() == "control"
    assert ((data.split == "test") & controls).sum() == 8
    with pytest.warns(UserWarning):
        np.testing.assert_array_equal(PerturbationData.from_anndata(adata, seed=1).split, data.split)
    # re-encoding for a trained model: the same cells, silently
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(PerturbationData.from_anndata(adata, spec=data.spec, seed=1).split, data.split)
    kept = PerturbationData.from_anndata(adata, heldout_control_fraction=0)
    np.testing.assert_array_equal(kept.split, split)
