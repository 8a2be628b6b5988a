"""Honest baselines (evaluate/baselines.py) and the model-vs-baselines comparison
(evaluate/comparison.py, through evaluate/ate.py)."""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp

from pyro_perturb.data import PerturbationData, simulate
from pyro_perturb.evaluate.ate import ate_evaluator, ate_results
from pyro_perturb.evaluate.baselines import BASELINES, STATISTICS, baseline_effects, covariate_additive
from pyro_perturb.evaluate.comparison import GROUPS, comparison_frame, comparison_table, heldout_pools
from pyro_perturb.normalize import pseudobulk_lfc
from pyro_perturb.registry import build


def _lognorm(x):
    return np.log2(1 + x / x.sum(1, keepdims=True) * 1e4)


def _norm(x):
    return x / x.sum(1, keepdims=True) * 1e4


# cells: label, split
CELLS = [
    ("control", "train"), ("control", "train"), ("control", "val"), ("control", "test"),
    ("A", "train"), ("A", "train"), ("A", "val"),
    ("B", "train"), ("B", "test"),
    ("A+B", "test"), ("A+B", "test"),
    ("C", "val"),
    ("A+C", "test"),
]


@pytest.fixture()
def hand_data():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 20, size=(len(CELLS), 4)).astype(np.float32)
    obs = pd.DataFrame({"perturbation": [c[0] for c in CELLS], "split": [c[1] for c in CELLS]},
                       index=[f"c{i}" for i in range(len(CELLS))])
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs)
    adata.var_names = [f"g{i}" for i in range(4)]
    return PerturbationData.from_anndata(adata), x.astype(np.float64)


def test_baselines_by_hand(hand_data):
    data, x = hand_data
    labels = np.array([c[0] for c in CELLS])
    train = np.array([c[1] == "train" for c in CELLS])
    evaluated = ["A", "B", "A+B", "C", "A+C"]
    out = baseline_effects(data, evaluated)
    assert set(out) == set(STATISTICS) and all(set(out[s]) == set(BASELINES) for s in STATISTICS)

    def effects(transform, stat):
        mean = {lab: transform(x[train & (labels == lab)]).mean(0) for lab in ("control", "A", "B")}
        if stat == "lognorm_delta":
            return {lab: mean[lab] - mean["control"] for lab in ("A", "B")}
        return {lab: np.log2(mean[lab] + 1) - np.log2(mean["control"] + 1) for lab in ("A", "B")}

    for stat, transform in (("lognorm_delta", _lognorm), ("pseudobulk_lfc", _norm)):
        eff = effects(transform, stat)
        pred = out[stat]
        np.testing.assert_array_equal(pred["no_change"].to_numpy(), 0.0)
        for lab in evaluated:  # training labels A and B
            np.testing.assert_allclose(pred["mean_effect"].loc[lab], (eff["A"] + eff["B"]) / 2, rtol=1e-9)
        np.testing.assert_allclose(pred["additive"].loc["A+B"], eff["A"] + eff["B"], rtol=1e-9)
        for lab in ("A", "B", "C", "A+C"):  # singles, and a combination with an untrained component
            assert pred["additive"].loc[lab].isna().all()
        np.testing.assert_allclose(pred["empirical"].loc["A"], eff["A"], rtol=1e-9)
        np.testing.assert_allclose(pred["empirical"].loc["B"], eff["B"], rtol=1e-9)
        for lab in ("A+B", "C", "A+C"):  # no training cells
            assert pred["empirical"].loc[lab].isna().all()


def test_pseudobulk_lfc_definition():
    np.testing.assert_allclose(pseudobulk_lfc(np.array([3.0, 0.0]), np.array([1.0, 1.0])), [1.0, -1.0])
    np.testing.assert_allclose(pseudobulk_lfc(np.array([1.0]), np.array([0.0]), pseudocount=0.5), [np.log2(3)])


def test_covariate_additive_by_hand_and_in_both_statistics():
    means = {("x", "ctrl"): np.array([1.0, 2.0]), ("y", "ctrl"): np.array([3.0, 3.0]),
             ("y", "t"): np.array([5.0, 2.0]), ("z", "ctrl"): np.array([0.0, 0.0]), ("z", "t"): np.array([4.0, 0.0])}
    # x: own control + mean shift of t in y and z: ((2, -1) + (4, 0)) / 2
    np.testing.assert_allclose(covariate_additive(means, "x", "t", "ctrl"), [4.0, 1.5])
    np.testing.assert_allclose(covariate_additive(means, "y", "t", "ctrl"), [7.0, 3.0])  # only z is "other"
    np.testing.assert_allclose(covariate_additive(means, "x", "ctrl", "ctrl"), [1.0, 2.0])
    assert covariate_additive(means, "w", "t", "ctrl") is None  # no control of w
    assert covariate_additive(means, "x", "u", "ctrl") is None  # u nowhere else

    # on data: label t trained in line y only, evaluated in line x
    rng = np.random.default_rng(1)
    rows = [("x", "control", "train")] * 6 + [("y", "control", "train")] * 6 + [("y", "t", "train")] * 6 + \
        [("x", "control", "val")] * 4 + [("x", "t", "test")] * 4
    x = rng.integers(1, 30, size=(len(rows), 5)).astype(np.float32)
    obs = pd.DataFrame({"line": [r[0] for r in rows], "perturbation": [r[1] for r in rows], "split": [r[2] for r in rows]},
                       index=[f"c{i}" for i in range(len(rows))])
    data = PerturbationData.from_anndata(ad.AnnData(sp.csr_matrix(x), obs=obs), covariate_keys=["line"])
    out = baseline_effects(data, ["t"])
    x = x.astype(np.float64)
    sel = {k: np.array([(r[0], r[1], r[2]) == k for r in rows]) for k in set(rows)}
    ln = {k: _lognorm(x[m]).mean(0) for k, m in sel.items()}
    nm = {k: _norm(x[m]).mean(0) for k, m in sel.items()}
    xc, yc, yt = ("x", "control", "train"), ("y", "control", "train"), ("y", "t", "train")
    # predicted mean of t in x = x's control + t's shift in y; effect against x's control
    np.testing.assert_allclose(out["lognorm_delta"]["covariate_additive"].loc["t"], ln[yt] - ln[yc], rtol=1e-9)
    expected_t = 2 ** (np.log2(nm[xc] + 1) + np.log2(nm[yt] + 1) - np.log2(nm[yc] + 1)) - 1
    np.testing.assert_allclose(out["pseudobulk_lfc"]["covariate_additive"].loc["t"],
                               np.log2(expected_t + 1) - np.log2(nm[xc] + 1), rtol=1e-9)


@pytest.fixture(scope="module")
def combo_adata():
    return simulate.combinatorial(
        seed=1, n_singles=5, n_doubles=6, cells_per_perturbation=30, n_control_cells=80,
        n_genes=30, n_latent=4, frac_combinations_train=0.5, n_ate_draws=100,
    )


def _pair(name, data):
    pyro.set_rng_seed(0)
    return build(name, data.spec, dict(n_latent=4, n_hidden=16), gene_stats=data.gene_stats("train"))[:2]


@pytest.mark.parametrize("name", ["cvae", "sams_vae"])
def test_comparison_block_has_every_predictor(combo_adata, tmp_path, name):
    data = PerturbationData.from_anndata(combo_adata)
    model, guide = _pair(name, data)
    run = SimpleNamespace(model=model, guide=guide, device="cpu", name=name)
    results = {"train": {}, "test": {}}
    ate_evaluator(run, data, results, tmp_path, seed=0, options={"ate_particles": 20, "ate_ppc": False, "ate_plots": False})
    comp = results["comparison"]
    heldout_controls = int(((data.split != "train") & (data.label_names() == "control")).sum())
    assert comp["control_cells"] == heldout_controls > 0
    assert comp["ate_library"] == "observed" and comp["library"].startswith("observed")
    assert results["ate"]["library"] == comp["library"] and "ate_pearson" in results["ate"]["all"]
    test_combos = combo_adata.uns["split_info"]["test_combinations"]
    for stat in STATISTICS:
        unseen, seen, every = comp[stat]["unseen"], comp[stat]["seen"], comp[stat]["all"]
        assert sorted(unseen["labels"]) == sorted(test_combos)
        assert {"model", "no_change", "mean_effect", "additive"} <= set(unseen) and "empirical" not in unseen
        assert {"model", "no_change", "mean_effect", "empirical"} <= set(seen) and "additive" not in seen  # singles
        assert every["n_labels"] == seen["n_labels"] + unseen["n_labels"]
        for group in GROUPS:
            entry = comp[stat][group]
            for metric in ("pearson_delta", "mse_delta", "mae_delta", "overlap_at_20", "de_direction_match_at_20",
                           "discrimination_score_l1", "pearson"):
                assert np.isfinite(entry["model"][metric]), (stat, group, metric)
                assert metric in entry["winner"] and isinstance(entry["winner"][metric]["model_wins"], bool)
            assert entry["no_change"]["mse_delta"] >= 0 and entry["no_change"]["pearson"] == 0.0
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert {"statistic", "group", "predictor", "n_labels", "pearson_delta", "mse_delta"} <= set(frame.columns)
    assert len(frame) == len(comparison_frame(comp))
    assert set(frame["predictor"]) == {"model", "no_change", "mean_effect", "additive", "empirical"}
    table = comparison_table(comp)
    assert "lognorm_delta, unseen labels" in table and "pseudobulk_lfc, seen labels" in table and "*" in table


def test_model_is_drawn_at_the_observed_pools_or_a_fixed_library(combo_adata):
    data = PerturbationData.from_anndata(combo_adata)
    model, guide = _pair("cvae", data)
    labels = ["p000", "p000+p001"]
    pools = heldout_pools(data, labels)
    names = data.label_names()
    held = data.split != "train"
    np.testing.assert_array_equal(pools["control"], data.library[(names == "control") & held])
    np.testing.assert_array_equal(pools["p000"], data.library[(names == "p000") & held])
    fixed = ate_results(model, guide, data, num_particles=10, library=1e4)
    assert fixed["library"] == "fixed 10000" and fixed["comparison"]["ate_library"] == 1e4
    with pytest.raises(ValueError, match="ate_library"):
        ate_results(model, guide, data, num_particles=10, library="deep")


def test_comparison_skipped_without_heldout_controls(combo_adata):
    adata = combo_adata.copy()
    split = adata.obs["split"].astype(str).to_numpy()
    split[adata.obs["perturbation"].astype(str).to_numpy() == "control"] = "train"
    adata.obs["split"] = split
    data = PerturbationData.from_anndata(adata, heldout_control_fraction=0)
    model, guide = _pair("cvae", data)
    with pytest.warns(UserWarning, match="no held-out control cells"):
        res = ate_results(model, guide, data, num_particles=10)
    assert "skipped" in res["comparison"] and res["comparison"]["control_cells"] == 0
    assert "skipped" in comparison_table(res["comparison"])


# cells of data with a covariate: line, label, split (a held-out (line, label) pair: L2 / A)
UNIT_CELLS = [
    ("L1", "control", "train"), ("L1", "control", "train"), ("L1", "control", "test"),
    ("L2", "control", "train"), ("L2", "control", "train"), ("L2", "control", "test"),
    ("L1", "A", "train"), ("L1", "A", "train"), ("L1", "A", "val"),
    ("L1", "B", "train"), ("L2", "B", "train"), ("L2", "B", "test"),
    ("L2", "A", "test"), ("L2", "A", "test"),
]


def test_covariate_units_baselines_and_block_by_hand():
    """Data with covariates: units are (line, label) pairs measured against their own line's
    held-out controls; baselines by hand (training cells only)."""
    from pyro_perturb.evaluate.comparison import compare_units, covariate_baseline_effects
    from pyro_perturb.evaluate.predictive import EffectPrediction

    rng = np.random.default_rng(3)
    x = rng.integers(1, 30, size=(len(UNIT_CELLS), 4)).astype(np.float32)
    obs = pd.DataFrame({"line": [c[0] for c in UNIT_CELLS], "perturbation": [c[1] for c in UNIT_CELLS],
                        "split": [c[2] for c in UNIT_CELLS]}, index=[f"c{i}" for i in range(len(UNIT_CELLS))])
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(4)]))
    data = PerturbationData.from_anndata(adata, covariate_keys=["line"], heldout_control_fraction=0)
    ln = _lognorm(x)
    lab = obs["perturbation"].to_numpy()
    line = obs["line"].to_numpy()
    train = obs["split"].to_numpy() == "train"

    def mean(mask):
        return ln[mask].mean(0)

    units = ["L2 / A", "L2 / B"]
    frames = covariate_baseline_effects(data, units)["lognorm_delta"]
    # the empirical effect of (L2, B) against L2's training controls
    expected_b = mean(train & (line == "L2") & (lab == "B")) - mean(train & (line == "L2") & (lab == "control"))
    np.testing.assert_allclose(frames["empirical"].loc["L2 / B"], expected_b, rtol=1e-6)
    assert frames["empirical"].loc["L2 / A"].isna().all()  # no training cell of (L2, A)
    # covariate-additive: A's training effect in the other line (L1)
    expected_a = mean(train & (line == "L1") & (lab == "A")) - mean(train & (line == "L1") & (lab == "control"))
    np.testing.assert_allclose(frames["covariate_additive"].loc["L2 / A"], expected_a, rtol=1e-6)
    np.testing.assert_allclose(frames["mean_effect"].loc["L2 / A"], expected_b, rtol=1e-6)  # L2's only trained label
    assert (frames["no_change"].to_numpy() == 0).all()

    # the block: a model that predicts the covariate-additive effect exactly ties it
    genes = list(data.spec.genes)

    def prediction(cov):
        rows = ["control", "A", "B"]
        effect = {"control": np.zeros(4), "A": frames["covariate_additive"].loc["L2 / A"].to_numpy(),
                  "B": frames["empirical"].loc["L2 / B"].to_numpy()}
        lognorm = pd.DataFrame([effect[r] for r in rows], index=rows, columns=genes)
        return EffectPrediction(ate=lognorm.loc[["A", "B"]], lognorm_mean=lognorm,
                                normalized_mean=pd.DataFrame(1.0, index=rows, columns=genes), library="fixed 10000",
                                estimator="integrated", num_particles=1)

    block, out = compare_units(data, {"L2": prediction("L2")})
    assert block["units"] == "covariate values x label" and block["control_cells"] == 2
    assert block["lognorm_delta"]["unseen"]["labels"] == ["L2 / A"]
    assert block["lognorm_delta"]["seen"]["labels"] == ["L2 / B"]
    unseen = block["lognorm_delta"]["unseen"]
    assert unseen["model"]["mse_delta"] == pytest.approx(unseen["covariate_additive"]["mse_delta"])
    observed_a = mean((line == "L2") & (lab == "A") & ~train) - mean((line == "L2") & (lab == "control") & ~train)
    np.testing.assert_allclose(out["observed"]["lognorm_delta"].loc["L2 / A"], observed_a, rtol=1e-6)
