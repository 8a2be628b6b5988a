"""The gene-graph family's plumbing, generic over any model with ``adjacency()``:
``Run.adjacency`` / ``Run.edges``, ``pyro-perturb graph``, the graph evaluator (edges
against the truth, I-NLL beside the no-edge baseline), held-out interventions and the
gene vocabulary (a knockout never seen in training). Uses the linear-SEM test double of
tests/graph_double.py; the real models (dcdfg, nodags) are exercised at the end when
registered."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_perturb import contract
from pyro_perturb.cli import main
from pyro_perturb.contract import Adjacency
from pyro_perturb.data import PerturbationData
from pyro_perturb.data.targets import gene_perturbation_vocabulary, with_gene_perturbations
from pyro_perturb.evaluate.graph import (
    EDGES_CSV,
    MIN_SD,
    PER_LABEL_CSV,
    adjacency_frame,
    called_edges,
    edge_list,
    edge_metrics,
    fit_no_edge,
    no_edge_baseline,
    no_edge_nll,
    score_no_edge,
)
from pyro_perturb.registry import build, list_models
from pyro_perturb.run import Run, fit, load_run

from .graph_double import NAME, registered, simulate_chain

TRAIN = dict(max_epochs=15, batch_size=128, lr=5e-2, seed=0, progress=False)


@pytest.fixture(scope="module")
def chain_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "chain.h5ad"
    simulate_chain(seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def double():
    with registered() as name:
        yield name


@pytest.fixture(scope="module")
def graph_run(double, chain_file, tmp_path_factory):
    """The double trained with the knockout of g2 held out (a saved run)."""
    out = tmp_path_factory.mktemp("graph") / "run"
    return fit(chain_file, model=double, out=out, heldout_perturbations=["g2"], **TRAIN)


def _weights(w, probability=False):
    return Adjacency(np.asarray(w, dtype=float), probability, [f"g{i}" for i in range(len(w))])


# ----------------------------------------------------------------------- tables of the graph


def test_adjacency_frame_rows_are_sources():
    adj = _weights([[0, 0.2, -0.9], [0.05, 0, 0], [0, 0.6, 0]])
    frame = adjacency_frame(adj)
    assert list(frame.index) == ["g0", "g1", "g2"] and frame.index.name == "source"
    assert frame.columns.name == "target" and frame.loc["g0", "g2"] == -0.9
    cut = adjacency_frame(adj, threshold=0.3)
    assert cut.loc["g0", "g1"] == 0 and cut.loc["g0", "g2"] == -0.9 and cut.loc["g2", "g1"] == 0.6


def test_edge_list_sorted_by_magnitude_with_top():
    adj = _weights([[0, 0.2, -0.9], [0.05, 0, 0], [0, 0.6, 0]])
    edges = edge_list(adj)
    assert list(edges.columns) == ["source", "target", "weight"]
    assert list(zip(edges.source, edges.target)) == [("g0", "g2"), ("g2", "g1"), ("g0", "g1"), ("g1", "g0")]
    assert list(edge_list(adj, top=2).weight) == [-0.9, 0.6]
    assert len(edge_list(adj, threshold=0.5)) == 2
    # probabilities: default threshold 0.5
    probs = _weights([[0, 0.7, 0.2], [0.51, 0, 0], [0, 0.4, 0]], probability=True)
    assert list(zip(edge_list(probs).source, edge_list(probs).target)) == [("g0", "g1"), ("g1", "g0")]


@pytest.mark.parametrize("threshold, probability", [(-0.1, False), (float("nan"), False), (float("inf"), False),
                                                     (1.5, True), ("high", False)])
def test_bad_threshold(threshold, probability):
    adj = _weights([[0, 0.7], [0.2, 0]], probability)
    with pytest.raises(ValueError, match="threshold"):
        adjacency_frame(adj, threshold)
    with pytest.raises(ValueError, match="threshold"):
        edge_list(adj, threshold)


@pytest.mark.parametrize("top", [0, -1, 1.5, True])
def test_bad_top(top):
    with pytest.raises(ValueError, match="top"):
        edge_list(_weights([[0, 0.7], [0.2, 0]]), top=top)


def test_run_adjacency_and_edges(graph_run):
    frame = graph_run.adjacency()
    genes = graph_run.spec.genes
    assert frame.shape == (len(genes), len(genes)) and list(frame.index) == genes
    np.testing.assert_allclose(frame.to_numpy(), contract.adjacency(graph_run.model).weights)
    assert np.all(np.diag(frame.to_numpy()) == 0)
    edges = graph_run.edges(top=3)
    assert len(edges) == 3 and np.all(np.diff(np.abs(edges.weight)) <= 0)
    with pytest.raises(ValueError, match="threshold"):
        graph_run.adjacency(threshold=-1)


def test_run_without_graph_names_the_model(tiny_data, double):
    model, guide, hp = build("cvae", tiny_data.spec)
    from pyro_perturb.infer import TrainConfig

    run = Run("cvae", model, guide, tiny_data.spec, hp, TrainConfig())
    with pytest.raises(ValueError, match="'cvae' has no gene graph.*" + NAME):
        run.adjacency()
    with pytest.raises(ValueError, match="'cvae' has no gene graph"):
        run.edges()
    from .graph_double import LinearSEMModel

    assert not contract.has_adjacency(model) and contract.has_adjacency(LinearSEMModel)


def test_cli_graph(graph_run, tmp_path, capsys):
    out, matrix = tmp_path / "edges.csv", tmp_path / "adj.csv"
    assert main(["graph", str(graph_run.path), "--out", str(out), "--top", "4", "--matrix", str(matrix),
                 "--threshold", "0.01"]) == 0
    edges = pd.read_csv(out)
    assert list(edges.columns) == ["source", "target", "weight"] and len(edges) <= 4
    frame = pd.read_csv(matrix, index_col=0)
    assert frame.shape == (5, 5) and (np.abs(frame.to_numpy()) > 0.01).sum() == len(graph_run.edges(threshold=0.01))
    assert "wrote" in capsys.readouterr().out
    assert main(["graph", str(graph_run.path), "--out", str(out), "--top", "0"]) == 2
    assert main(["graph", str(graph_run.path), "--out", str(out), "--threshold", "-1"]) == 2
    assert "threshold" in capsys.readouterr().err


def test_cli_graph_on_a_model_without_graph(tiny_adata, tmp_path, capsys):
    run = fit(tiny_adata, model="cvae", out=tmp_path / "cvae", max_epochs=1, n_latent=2, progress=False)
    assert main(["graph", str(run.path), "--out", str(tmp_path / "e.csv")]) == 2
    assert "'cvae' has no gene graph" in capsys.readouterr().err


# ----------------------------------------------------------------------- edge metrics


def test_called_edges_rules():
    w = np.array([[0, 0.9, 0.1], [0.3, 0, 0.0], [0.0, 0.8, 0]])
    called, rule = called_edges(_weights(w), n_true_edges=2)
    assert rule == "top-k (k = true edges = 2)" and called.sum() == 2 and called[0, 1] and called[2, 1]
    called, rule = called_edges(_weights(w))
    assert rule == "weight != 0" and called.sum() == 4
    called, rule = called_edges(_weights(w, probability=True), 1)
    assert rule == "probability > 0.5" and called.sum() == 2


def test_edge_metrics_perfect_and_density():
    truth = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])
    m = edge_metrics(truth, _weights(truth * 0.7 + 0.01 * (1 - np.eye(3))))
    assert m["shd"] == 0 and m["f1"] == 1.0 and m["auprc"] == 1.0
    assert m["edge_density"] == pytest.approx(2 / 6) and m["threshold_rule"].startswith("top-k")


# ----------------------------------------------------------------------- no-edge baseline


def test_no_edge_nll_matches_gaussian_density():
    rng = np.random.default_rng(0)
    train = rng.normal(1.0, 2.0, size=(400, 3))
    targeted = np.zeros((400, 3), bool)
    targeted[:100, 0] = True
    train[:100, 0] = -50.0  # a knocked-out gene's values must not enter its fit
    mean, sd = fit_no_edge(train, targeted)
    assert mean[0] == pytest.approx(train[100:, 0].mean()) and sd[0] == pytest.approx(train[100:, 0].std())
    test = rng.normal(size=(5, 3))
    test_targeted = np.zeros((5, 3), bool)
    test_targeted[0, 1] = True
    nll = no_edge_nll(train, targeted, test, test_targeted)
    expected = -torch.distributions.Normal(torch.tensor(mean), torch.tensor(sd)).log_prob(torch.tensor(test)).numpy()
    expected[0, 1] = 0.0
    np.testing.assert_allclose(nll, expected.sum(1), rtol=1e-10)


def test_no_edge_sd_is_floored_and_bad_shapes_raise():
    _, sd = fit_no_edge(np.ones((10, 2)), np.zeros((10, 2), bool))
    assert np.all(sd == MIN_SD)
    with pytest.raises(ValueError, match="shape"):
        no_edge_nll(np.ones((4, 2)), np.zeros((4, 3), bool), np.ones((2, 2)), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="genes"):
        score_no_edge(np.zeros(2), np.ones(2), np.ones((2, 3)), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="targeted in every"):
        fit_no_edge(np.ones((3, 2)), np.array([[True, False]] * 3))


def test_no_edge_baseline_on_data_streams_the_same(chain_file):
    import anndata as ad

    data = PerturbationData.from_anndata(ad.read_h5ad(chain_file))
    train, test = data.indices("train"), data.indices("test")
    x = lambda idx: np.log1p(1e4 * data.read_counts(idx).astype(float) / data.library[idx, None])  # noqa: E731
    targeted = lambda idx: np.array([[lab == g for g in data.spec.genes] for lab in data.label_names(idx)])  # noqa: E731
    np.testing.assert_allclose(no_edge_baseline(data, test), no_edge_nll(x(train), targeted(train), x(test), targeted(test)))


# ----------------------------------------------------------------------- the evaluator


def test_evaluate_reports_edges_and_inll(graph_run, tmp_path):
    data = load_run(graph_run.path).load_data()
    results = graph_run.evaluate(data, num_particles=2, out_dir=tmp_path, ate_plots=False, ate_ppc=False,
                                 ate_particles=20)
    block = results["graph"]
    assert block["edges"]["n_edges_true"] == 4 and block["edges"]["threshold_rule"] == "top-k (k = true edges = 4)"
    assert 0 <= block["edges"]["auprc"] <= 1 and block["edges"]["edge_density"] == pytest.approx(0.2)
    # the ridge-regression baseline of the edges, scored the same way
    baseline = block["edges_regression_baseline"]
    assert baseline["threshold_rule"] == block["edges"]["threshold_rule"] and 0 <= baseline["auprc"] <= 1
    # the I-NLL is -IWELBO of the split, and the held-out block is the knockout of g2
    assert block["inll"]["test"]["inll_model"] == pytest.approx(-results["test"]["iwelbo"])
    assert block["inll_heldout"]["labels"] == ["g2"]
    table = pd.read_csv(tmp_path / PER_LABEL_CSV)
    assert list(table.perturbation) == ["g2"] and table.n_train_cells.tolist() == [0]
    assert table.inll_model[0] == pytest.approx(block["inll"]["test"]["inll_model"])
    edges = pd.read_csv(tmp_path / EDGES_CSV)
    assert len(edges) == 4 and "true_edge" in edges.columns
    from pyro_perturb.evaluate import write_metrics

    write_metrics(results, tmp_path / "metrics.json")
    assert "graph" in json.loads((tmp_path / "metrics.json").read_text())


def test_evaluator_skips_models_without_graph(tiny_data):
    from pyro_perturb.evaluate.graph import graph_evaluator
    from pyro_perturb.infer import TrainConfig

    model, guide, hp = build("cvae", tiny_data.spec)
    results: dict = {}
    graph_evaluator(Run("cvae", model, guide, tiny_data.spec, hp, TrainConfig()), tiny_data, results, None, 0, {})
    assert "graph" not in results


def test_cli_evaluate_on_a_graph_run(graph_run, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(graph_run.path), "--out", str(out), "--num-particles", "2", "--ate-particles", "10",
                 "--no-plots", "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["graph"]["edges"]["shd"] >= 0 and (tmp_path / PER_LABEL_CSV).exists()


# ----------------------------------------------------------------------- held-out interventions


def test_heldout_perturbations_split_and_vocabulary(graph_run):
    data = graph_run.data
    test_labels = set(data.label_names(data.indices("test")))
    assert test_labels == {"g2"}
    assert "g2" not in set(data.label_names(data.indices("train")))
    assert "g2" in graph_run.spec.perturbations  # its target is known
    reloaded = load_run(graph_run.path).load_data()  # the same split, rebuilt from the path
    np.testing.assert_array_equal(reloaded.split, data.split)


def test_heldout_perturbations_bad_input(double, chain_file, tmp_path):
    import anndata as ad

    with pytest.raises(ValueError, match="not found"):
        fit(chain_file, model=double, heldout_perturbations=["nope"], **TRAIN)
    with pytest.raises(ValueError, match="control"):
        fit(chain_file, model=double, heldout_perturbations=["control"], **TRAIN)
    adata = ad.read_h5ad(chain_file)
    adata.obs["split"] = "train"
    with pytest.raises(ValueError, match="split column"):
        fit(adata, model=double, heldout_perturbations=["g2"], **TRAIN)


def test_cli_fit_heldout_perturbations(double, chain_file, tmp_path):
    out = tmp_path / "run"
    assert main(["fit", "--model", double, "--data", str(chain_file), "--out", str(out), "--max-epochs", "1",
                 "--heldout-perturbations", "g1,g2", "--quiet"]) == 0
    run = load_run(out)
    assert run.data_options["heldout_perturbations"] == ["g1", "g2"]
    assert set(run.data.label_names(run.data.indices("test"))) == {"g1", "g2"}


# ----------------------------------------------------------------------- the gene vocabulary


def test_with_gene_perturbations_keeps_each_cells_targets(chain_file):
    import anndata as ad

    data = PerturbationData.from_anndata(ad.read_h5ad(chain_file))
    assert data.spec.perturbations == ["g0", "g1", "g2"]
    wide = with_gene_perturbations(data)
    assert wide.spec.perturbations == gene_perturbation_vocabulary(data.spec) == [f"g{i}" for i in range(5)]
    assert wide.spec.labels == data.spec.labels and wide.dosage.shape == (data.n_cells, 5)
    names = np.asarray(wide.spec.perturbations)
    dose = np.asarray(wide.dosage.todense())
    for lab, row in zip(data.label_names(), dose):
        assert list(names[row > 0]) == ([] if lab == "control" else [lab])
    assert with_gene_perturbations(wide) is wide


def test_graph_run_predicts_a_knockout_never_seen(graph_run):
    assert graph_run.spec.perturbations == [f"g{i}" for i in range(5)]
    ate = graph_run.ate(["g3", "g2"], num_particles=20, library=1e4)  # g3: never perturbed; g2: held out
    assert list(ate.index) == ["g3", "g2"] and np.isfinite(ate.to_numpy()).all()
    assert ate.loc["g3", "g3"] < 0  # the knockout sets its gene to 0 (the double's convention)
    with pytest.raises(ValueError, match="vocabulary"):
        graph_run.ate(["not_a_gene"], num_particles=5, library=1e4)


def test_non_graph_models_keep_their_vocabulary(tiny_adata):
    run = fit(tiny_adata, model="cvae", max_epochs=1, n_latent=2, progress=False)
    assert run.spec.perturbations == PerturbationData.from_anndata(tiny_adata).spec.perturbations


# ----------------------------------------------------------------------- the real graph models


@pytest.mark.parametrize("name", ["dcdfg", "nodags"])
def test_real_graph_models_plumbing(name, tmp_path):
    if name not in {e.name for e in list_models()}:
        pytest.skip(f"{name} is not registered in this checkout")
    adata = simulate_chain(seed=1, n_genes=5)
    run = fit(adata, model=name, out=tmp_path / name, heldout_perturbations=["g2"], max_epochs=2, progress=False)
    frame = run.adjacency()
    assert frame.shape == (5, 5) and list(frame.columns) == list(adata.var_names)
    assert list(run.edges(top=3).columns) == ["source", "target", "weight"]
    assert run.spec.perturbations == list(adata.var_names)  # every gene: g3 and g4 were never knocked out
    results = run.evaluate(run.data, num_particles=2, out_dir=tmp_path / "eval", ate_plots=False, ate_ppc=False,
                           ate_particles=10)
    block = results["graph"]
    assert block["edges"]["n_edges_true"] == 4 and block["inll_heldout"]["labels"] == ["g2"]
    assert math.isfinite(block["inll"]["test"]["inll_model"]) and math.isfinite(block["inll"]["test"]["inll_no_edge"])
    assert main(["graph", str(run.path), "--out", str(tmp_path / "edges.csv"), "--top", "3"]) == 0
    ate = run.ate(["g4", "g2"], num_particles=5, library=1e4)  # g4: a knockout never in the data
    assert np.isfinite(ate.to_numpy()).all()


def test_cli_evaluate_dcdfg_on_builtin_data(tmp_path):
    """`pyro-perturb evaluate` on a dcdfg run trained on the built-in causal_dag data reports
    its edges against the simulator's truth (the reloaded data keep varp)."""
    if "dcdfg" not in {e.name for e in list_models()}:
        pytest.skip("dcdfg is not registered in this checkout")
    run_dir = tmp_path / "run"
    assert main(["fit", "--model", "dcdfg", "--out", str(run_dir), "--max-epochs", "1", "--quiet"]) == 0
    assert "true_adjacency" in load_run(run_dir).load_data().adata.varp
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(run_dir), "--out", str(out), "--num-particles", "2", "--ate-particles", "10",
                 "--no-plots", "--device", "cpu"]) == 0
    graph = json.loads(out.read_text())["graph"]
    assert graph["edges"]["threshold_rule"] == "probability > 0.5" and 0 <= graph["edges"]["auprc"] <= 1
    assert graph["inll_heldout"]["n_cells"] > 0 and (tmp_path / PER_LABEL_CSV).exists()


def test_run_encodes_data_of_the_narrower_vocabulary(graph_run, chain_file):
    """Data encoded before every gene joined the vocabulary are re-encoded over it."""
    import anndata as ad

    narrow = PerturbationData.from_anndata(ad.read_h5ad(chain_file))
    wide = graph_run.encode(narrow)
    assert wide.spec.perturbations == graph_run.spec.perturbations and wide.dosage.shape[1] == 5
    assert np.isfinite(graph_run.iwelbo(narrow, split=None, num_particles=1)).all()
    with pytest.raises(ValueError, match="not in the vocabulary"):
        from pyro_perturb.data.targets import with_perturbation_vocabulary

        with_perturbation_vocabulary(narrow, ["g0"])
