"""Model-based differential expression (pyro_perturb.evaluate.de): the FDR decision rule,
self-normalised importance weights on an analytic toy, the frame on every zoo model, a
tiny fit that finds a strongly perturbed gene, Run / CLI entry points and their errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import pyro_perturb as pp
from pyro_perturb.cli import main
from pyro_perturb.data import Batch, simulate
from pyro_perturb.evaluate import de
from pyro_perturb.infer.engine import TrainConfig
from pyro_perturb.infer.iwelbo import particle_traces, trace_log_weights
from pyro_perturb.registry import build, list_models

from .small_sims import SMALL_SIMS

# --------------------------------------------------------------------------- decision rule


def test_fdr_rule_exact_set():
    p = np.array([0.5, 0.99, 0.1, 0.9, 0.98])
    # sorted 0.99, 0.98, 0.9, 0.5: running means of 1 - p 0.01, 0.015, 0.0433, 0.1575
    is_de, expected = de.fdr_decisions(p, 0.05)
    assert is_de.tolist() == [False, True, False, True, True]
    np.testing.assert_allclose(expected[[1, 4, 3, 0]], [0.01, 0.015, 0.13 / 3, 0.63 / 4])
    assert de.fdr_decisions(p, 0.0)[0].sum() == 0
    assert de.fdr_decisions(p, 1.0)[0].all()
    # a set whose mean is exactly alpha is kept; ties enter together or not at all
    assert de.fdr_decisions(np.array([0.96, 0.96, 0.5]), 0.04)[0].tolist() == [True, True, False]
    assert de.fdr_decisions(np.array([1.0, 0.9, 0.9]), 0.05)[0].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="prob_de"):
        de.fdr_decisions(np.array([0.5, 1.5]), 0.1)


# --------------------------------------------------------------------------- importance weights


class _ToyModel(PyroModule):
    """z ~ N(0, 1), x | z ~ N(z, 1) per cell: posterior N(x / 2, 1 / 2)."""

    max_plate_nesting = 1

    def forward(self, batch: Batch, observe: bool = True):
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = pyro.sample("z", dist.Normal(batch.library.new_zeros((batch.size, 1)), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=batch.x if observe else None)


class _ToyGuide(PyroModule):
    def __init__(self, shift: float = 0.0, scale: float = math.sqrt(0.5)) -> None:
        super().__init__()
        self.shift, self.scale = shift, scale

    def forward(self, batch: Batch, observe: bool = True):
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            pyro.sample("z", dist.Normal(batch.x / 2 + self.shift, self.scale).to_event(1))


def _toy_batch():
    x = torch.tensor([[-1.0], [0.5], [2.0]])
    return Batch.from_tensors(x, d=x.new_zeros((3, 0)), library=x.new_ones(3)), x[:, 0] / 2


def _weighted_mean(guide, n_particles: int, seed: int = 0):
    batch, _ = _toy_batch()
    pyro.set_rng_seed(seed)
    guide_trace, model_trace, dim = particle_traces(_ToyModel(), guide, batch, n_particles)
    w = de.self_normalized_weights(trace_log_weights(guide_trace, model_trace, dim, n_particles, batch.size))
    z = guide_trace.nodes["z"]["value"][..., 0]  # (K, B)
    return w, (w * z).sum(0)


def test_weights_sum_to_one_and_are_uniform_when_the_proposal_is_the_posterior():
    _, truth = _toy_batch()
    w, mean = _weighted_mean(_ToyGuide(), 64)
    assert w.shape == (64, 3)
    torch.testing.assert_close(w.sum(0), torch.ones(3))
    # p(x, z) / q(z | x) = p(x) for every particle: the weights are all 1 / K
    torch.testing.assert_close(w, torch.full_like(w, 1 / 64))
    # the defensive mixture with a = 1 is the guide itself
    w1, _ = _weighted_mean(de.DefensiveProposal(guide_weight=1.0)(_ToyGuide()), 64)
    torch.testing.assert_close(w1, torch.full_like(w1, 1 / 64))
    # a mixture proposal is no longer the posterior, but the weights still sum to 1
    w2, mean2 = _weighted_mean(de.DefensiveProposal(0.5, 2.0)(_ToyGuide()), 4000)
    torch.testing.assert_close(w2.sum(0), torch.ones(3))
    assert w2.std() > 0
    torch.testing.assert_close(mean2, truth, atol=0.05, rtol=0)


def test_importance_corrects_a_biased_narrow_guide():
    _, truth = _toy_batch()
    wrong = _ToyGuide(shift=0.4, scale=0.4)  # shifted and too narrow
    _, plain = _weighted_mean(de.DefensiveProposal(guide_weight=1.0)(wrong), 1)
    _, corrected = _weighted_mean(de.DefensiveProposal(0.5, 3.0)(wrong), 4000)
    assert (plain - truth).abs().min() > 0.1  # one draw of q: off by the shift, on average
    torch.testing.assert_close(corrected, truth, atol=0.06, rtol=0)


def test_defensive_proposal_checks_its_arguments():
    with pytest.raises(ValueError, match="guide_weight"):
        de.DefensiveProposal(guide_weight=0.0)
    with pytest.raises(ValueError, match="scale_factor"):
        de.DefensiveProposal(scale_factor=0.5)


# --------------------------------------------------------------------------- every zoo model

COLUMNS = ["lfc_mean", "lfc_sd", "lfc_low", "lfc_high", "prob_de", "expected_fdr", "is_de", "mean_a", "mean_b"]


@pytest.fixture(scope="module")
def small_data():
    out = {}
    for kind, sizes in SMALL_SIMS.items():
        adata, options = pp.run.builtin_data(kind, seed=0, **sizes)
        out[kind] = pp.PerturbationData.from_anndata(adata, **options)
    return out


@pytest.mark.parametrize("name", [entry.name for entry in list_models()])
def test_every_model_gives_a_frame(name, small_data):
    """DE compares two groups of observed cells, so it needs no dosage: every latent-variable
    model of the zoo (scVI and the label-free VAEs included) gives a frame; the gene-graph
    models, point estimates without per-cell latents, are refused by name."""
    entry = pp.registry.get_entry(name)
    data = small_data[entry.default_data]
    hp = {k: v for k, v in {"n_latent": 3, "n_hidden": 8}.items() if k in entry.hyperparameters()}
    if entry.default_data == "factorized":
        hp.pop("n_latent", None)
    pyro.set_rng_seed(0)
    model, guide, hparams = build(name, data.spec, hp, gene_stats=data.gene_stats())
    run = pp.Run(name, model, guide, data.spec, hparams, TrainConfig())
    labels = pd.Series(data.label_names()).value_counts()
    label = next(lab for lab, n in labels.items() if lab != data.spec.control and n >= 3)
    if pp.contract.has_adjacency(model):
        with pytest.raises(ValueError, match=f"{name}.*gene-graph model"):
            de.differential_expression(run, data, label)
        return
    for method in de.METHODS:
        frame = de.differential_expression(run, data, label, method=method, n_particles=4, n_samples=3, n_cells=8)
        assert list(frame.columns) == COLUMNS and list(frame.index) == data.spec.genes
        assert np.isfinite(frame[["lfc_mean", "prob_de", "mean_a", "mean_b"]].to_numpy()).all()
        assert frame.attrs["n_cells_a"] == min(8, labels[label]) and frame.attrs["method"] == method


@pytest.mark.parametrize("likelihood", ["poisson", "gaussian"])
def test_other_likelihoods(likelihood, small_data):
    data = small_data["combinatorial"]
    pyro.set_rng_seed(0)
    model, guide, hparams = build("cvae", data.spec, {"n_latent": 3, "n_hidden": 8, "likelihood": likelihood},
                                  gene_stats=data.gene_stats())
    run = pp.Run("cvae", model, guide, data.spec, hparams, TrainConfig())
    frame = de.differential_expression(run, data, "p000", n_particles=4, n_samples=3)
    assert np.isfinite(frame[["lfc_mean", "prob_de"]].to_numpy()).all() and (frame["mean_a"] >= 0).all()


# --------------------------------------------------------------------------- a tiny fit


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    adata = simulate.combinatorial(n_singles=2, n_doubles=0, n_genes=30, cells_per_perturbation=80,
                                   n_control_cells=120, shift_sd=2.5, seed=1, n_ate_draws=10)
    folder = tmp_path_factory.mktemp("de")
    adata.write_h5ad(folder / "data.h5ad")
    out = folder / "run"
    run = pp.fit(adata, model="cvae", out=out, max_epochs=60, n_latent=4, n_hidden=32, seed=0, progress=False)
    return run, adata, out


def _true_lfc(adata, frame):
    decoder = adata.uns["ground_truth"]["decoder"]
    z = np.asarray(adata.obsm["z_true"], dtype=np.float64)
    a = simulate.decoder_proportions(decoder, z[frame.attrs["cells_a"]]).mean(0) * 1e4
    b = simulate.decoder_proportions(decoder, z[frame.attrs["cells_b"]]).mean(0) * 1e4
    return np.log2(a + 1) - np.log2(b + 1)


@pytest.mark.parametrize("method", de.METHODS)
def test_tiny_fit_finds_the_strongest_gene(fitted, method):
    run, adata, _ = fitted
    frame = run.differential_expression("p001", method=method, data=adata, n_particles=10, n_samples=20)
    assert list(frame.index) == list(adata.var_names) and list(frame.columns) == COLUMNS
    truth = _true_lfc(adata, frame)
    strongest = int(np.argmax(np.abs(truth)))
    assert abs(truth[strongest]) > 1.0
    assert frame["is_de"].iloc[strongest] and frame["prob_de"].iloc[strongest] > 0.95
    assert np.sign(frame["lfc_mean"].iloc[strongest]) == np.sign(truth[strongest])
    assert frame.attrs["expected_fdr"] <= 0.05 and frame.attrs["n_de"] == int(frame["is_de"].sum())
    assert np.corrcoef(frame["lfc_mean"], truth)[0, 1] > 0.5
    if method == "importance":
        assert 0 < frame.attrs["mean_relative_ess"] <= 1
    pairs = run.differential_expression("p001", method=method, data=adata, mode="pairs", n_particles=5, n_samples=5)
    assert pairs["lfc_sd"].mean() > frame["lfc_sd"].mean()  # cell-to-cell variation


def test_same_seed_same_frame_and_errors(fitted):
    run, adata, _ = fitted
    a = run.differential_expression("p000", data=adata, n_particles=4, n_samples=3, seed=3)
    b = run.differential_expression("p000", data=adata, n_particles=4, n_samples=3, seed=3)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match=r"unknown perturbation label 'nope'.*known labels.*'control'"):
        run.differential_expression("nope", data=adata)
    with pytest.raises(ValueError, match="same label"):
        run.differential_expression("control", data=adata)
    few = adata[np.r_[np.flatnonzero(adata.obs["perturbation"] == "control"),
                      np.flatnonzero(adata.obs["perturbation"] == "p000")[:2]]].copy()
    with pytest.raises(ValueError, match="'p000' has 2 cells"):
        run.differential_expression("p000", data=few)
    with pytest.raises(ValueError, match="method"):
        run.differential_expression("p000", data=adata, method="exact")


def test_cli_de_writes_csv_and_plot(fitted, tmp_path, capsys):
    _, _, run_dir = fitted
    out, plot = tmp_path / "de.csv", tmp_path / "volcano.png"
    data = str(run_dir.parent / "data.h5ad")
    code = main(["de", str(run_dir), "--perturbation", "p000", "--data", data, "--out", str(out), "--plot", str(plot),
                 "--n-particles", "4", "--n-samples", "5", "--device", "cpu"])
    assert code == 0
    frame = pd.read_csv(out, index_col=0)
    assert list(frame.columns) == COLUMNS and len(frame) == 30
    assert plot.exists() and plot.stat().st_size > 1000
    assert "genes DE (p000 vs control" in capsys.readouterr().out
    code = main(["de", str(run_dir), "--perturbation", "pX", "--data", data, "--out", str(tmp_path / "x.csv"), "--device", "cpu"])
    assert code == 2 and "unknown perturbation label 'pX'" in capsys.readouterr().err


def test_cli_constants_match_the_module():
    from pyro_perturb.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["de"]
    options = {a.dest: a for a in sub._actions}
    assert options["delta"].default == de.DEFAULT_DELTA
    assert tuple(options["method"].choices) == de.METHODS and tuple(options["mode"].choices) == de.MODES
