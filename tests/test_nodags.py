"""NODAGS-Flow (pyro_perturb/models/nodags.py) and the cyclic simulator
(pyro_perturb/data/simulate_cyclic.py): the log-determinant estimator, the contraction,
the interventional likelihood, fixed-point sampling, the simulator's truth, and edge
recovery on a small cyclic graph."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pyro import poutine

import pyro_perturb as pp
from pyro_perturb import contract
from pyro_perturb.data.simulate_cyclic import _has_cycle, cyclic_graph, sem_map
from pyro_perturb.evaluate.graph_metrics import edge_auprc
from pyro_perturb.models.nodags import ContractiveGatedMap, exact_logdet, power_series_logdet
from pyro_perturb.registry import build


def _map(n_genes: int = 6, mechanism: str = "mlp", lipschitz: float = 0.9, seed: int = 0) -> ContractiveGatedMap:
    torch.manual_seed(seed)
    fn = ContractiveGatedMap(n_genes, 8, mechanism, lipschitz)
    with torch.no_grad():
        fn.gate_logit.normal_(0.0, 2.0)
    return fn


def _jacobians(fn, s: torch.Tensor) -> torch.Tensor:
    """``(N, G, G)`` by plain autograd (torch.func's first call costs seconds)."""
    return torch.stack([torch.autograd.functional.jacobian(fn, row) for row in s])


@pytest.mark.parametrize("mechanism", ["mlp", "linear"])
def test_power_series_logdet_matches_slogdet(mechanism):
    """The Hutchinson power-series estimate, averaged over probes, matches the exact
    log|det(I - U J)|; with or without targeted rows; the roulette tail too."""
    torch.manual_seed(1)
    fn = _map(mechanism=mechanism)
    s = torch.randn(4, 6)
    observed = torch.ones(4, 6)
    observed[1, 2] = observed[3, [0, 4]] = 0.0
    exact = exact_logdet(fn, s, observed)
    jac = _jacobians(fn, s)
    torch.testing.assert_close(fn.jacobian(s), jac)  # the closed form
    by_hand = torch.linalg.slogdet(torch.eye(6) - observed.unsqueeze(-1) * jac).logabsdet
    torch.testing.assert_close(exact, by_hand)
    torch.manual_seed(2)
    estimate, out = power_series_logdet(fn, s.repeat(2000, 1), observed.repeat(2000, 1), n_terms=30, create_graph=False)
    torch.testing.assert_close(out[:4], fn(s))
    estimate = estimate.reshape(2000, 4)
    standard_error = estimate.std(0) / 2000**0.5
    assert ((estimate.mean(0) - exact).abs() < 4 * standard_error + 0.005).all(), (estimate.mean(0), exact, standard_error)
    if mechanism == "mlp":  # the roulette tail is the same code for either map
        return
    torch.manual_seed(3)
    roulette = torch.stack([power_series_logdet(fn, s.repeat(50, 1), observed.repeat(50, 1), n_terms=3, roulette=True,
                                                create_graph=False)[0].reshape(50, 4) for _ in range(200)])
    roulette = roulette.reshape(-1, 4)
    standard_error = roulette.std(0) / len(roulette) ** 0.5
    assert ((roulette.mean(0) - exact).abs() < 4 * standard_error + 0.01).all(), (roulette.mean(0), exact, standard_error)


@pytest.mark.parametrize("mechanism", ["mlp", "linear"])
def test_map_is_contractive_before_and_after_training(mechanism):
    """||J_F(s)||_2 <= lipschitz everywhere we look, also after weights are pushed to grow."""
    fn = _map(mechanism=mechanism, lipschitz=0.7)
    s = 3.0 * torch.randn(16, 6)
    assert torch.linalg.matrix_norm(_jacobians(fn, s), ord=2).max() <= 0.7 + 1e-5
    optimizer = torch.optim.Adam(fn.parameters(), lr=0.1)
    for _ in range(30):  # try to make F as steep as possible
        loss = -(fn(s) - fn(s.flip(0))).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        a, b = torch.randn(256, 6), torch.randn(256, 6)
        ratio = (fn(a) - fn(b)).norm(dim=-1) / (a - b).norm(dim=-1)
    assert ratio.max() <= 0.7 + 1e-5
    assert torch.linalg.matrix_norm(_jacobians(fn, s), ord=2).max() <= 0.7 + 1e-5
    # the edge strengths bound each partial derivative
    bound = fn.edge_strength().detach().T  # [j, i]
    assert (_jacobians(fn, s).abs() <= bound + 1e-5).all()


@pytest.fixture(scope="module")
def small():
    adata = cyclic_graph(seed=0, n_genes=6, cells_per_perturbation=10, n_control_cells=20)
    data = pp.PerturbationData.from_anndata(adata)
    model, guide, _ = build("nodags", data.spec, {"n_hidden": 8})
    model.eval()
    return adata, data, model, guide


def _batch(adata, data, labels):
    idx = np.array([np.flatnonzero(adata.obs["perturbation"].astype(str) == lab)[0] for lab in labels])
    return data.batch(idx)


def test_log_prob_ignores_targeted_genes_noise(small):
    """A targeted gene's own residual does not enter the likelihood: changing its noise
    model changes the score of cells where it is not targeted only; the log-det is the
    non-targeted block's."""
    adata, data, model, _ = small
    with torch.no_grad():
        model.sem.gate_logit.normal_(0.0, 1.0)
    batch = _batch(adata, data, ["control", "gene_02", "gene_03"])
    y = pp.normalize.log1p_normalize(batch.x, batch.library)
    targeted = model._levels(batch)[0]
    assert targeted.sum() == 2 and targeted[1, 2] and targeted[2, 3]
    before = model.interventional_log_prob(y, targeted)
    with torch.no_grad():
        model.noise_loc[2] += 1.0
        model.noise_log_scale[2] += 0.5
    after = model.interventional_log_prob(y, targeted)
    with torch.no_grad():
        model.noise_loc[2] -= 1.0
        model.noise_log_scale[2] -= 0.5
    assert after[1] == before[1]
    assert (after[[0, 2]] != before[[0, 2]]).all()
    # the log-det of I - U J is the determinant of the non-targeted block
    s = model._standardise(y)
    jac = _jacobians(model.sem, s)
    keep = [g for g in range(7) if g != 3]
    block = torch.eye(6) - jac[2][keep][:, keep]
    full = exact_logdet(model.sem, s, (~targeted).float())
    torch.testing.assert_close(full[2], torch.linalg.slogdet(block).logabsdet)


def test_fixed_point_sampling_solves_the_sem(small):
    """Draws satisfy s = F(s) + e on non-targeted genes and s = c on targeted ones; the
    observed site draws y of shape (B, G) through the graph."""
    adata, data, model, _ = small
    torch.manual_seed(0)
    targeted = torch.zeros(5, 7, dtype=torch.bool)
    targeted[1, 0] = targeted[2, [1, 4]] = True
    levels = torch.randn(5, 7)
    noise = torch.randn(5, 7)
    y = model.fixed_point(targeted, levels, noise)
    s = model._standardise(y)
    c = model._standardise(levels)
    with torch.no_grad():
        residual = s - model.sem(s) - noise
    assert residual[~targeted].abs().max() < 1e-5
    torch.testing.assert_close(s[targeted], c[targeted])
    batch = _batch(adata, data, ["control", "gene_01"])
    trace = poutine.trace(model).get_trace(replace(batch, x=None), observe=False)
    draws = trace.nodes["x"]["value"]
    assert draws.shape == (2, 7) and torch.isfinite(draws).all()


def test_simulator_truth_has_cycles_and_sem_follows_it():
    adata = cyclic_graph(seed=3, n_genes=10, mechanism="nonlinear", cells_per_perturbation=30, n_control_cells=300)
    truth = adata.varp["true_adjacency"]
    assert truth.shape == (11, 11) and adata.var_names[-1] == "background"
    assert list(adata.uns["ground_truth"]["graph_genes"]) == list(adata.var_names[:10])
    assert _has_cycle(truth) and not truth[-1].any() and not truth[:, -1].any()
    assert np.linalg.norm(truth, 2) < 1.0 and adata.uns["ground_truth"]["lipschitz_bound"] < 1.0
    weights = truth[:10, :10]
    values = adata.layers["sem"][:, :10].astype(float)
    controls = (adata.obs["perturbation"] == "control").to_numpy()
    fn = sem_map(weights, adata.uns["ground_truth"]["bias"], "nonlinear")
    residual = values[controls] - fn(values[controls])
    np.testing.assert_allclose(residual.std(0), 0.5, atol=0.08)  # the noise
    wrong = sem_map(weights.T, adata.uns["ground_truth"]["bias"], "nonlinear")
    assert (values[controls] - wrong(values[controls])).std() > residual.std() + 0.02
    gene = (adata.obs["perturbation"] == "gene_04").to_numpy()
    assert abs(values[gene, 4].mean() + 2.0) < 0.3  # the knockdown level
    assert not _has_cycle(np.triu(np.ones((4, 4)), 1))


def test_guide_latents_are_the_sem_noise(small):
    adata, data, model, guide = small
    batch = _batch(adata, data, ["control", "gene_05"])
    latents = guide.posterior_latents(batch)["X_latent"]
    y = pp.normalize.log1p_normalize(batch.x, batch.library)
    s = model._standardise(y)
    with torch.no_grad():
        expected = s - model.sem(s)
    torch.testing.assert_close(latents[0], expected[0])
    assert latents[1, 5] == 0 and latents[1, 4] == expected[1, 4]
    adjacency = contract.adjacency(model)
    assert adjacency.weights.shape == (7, 7) and (np.diag(adjacency.weights) == 0).all()


def test_short_fit_recovers_cyclic_edges():
    """Ten genes, linear cyclic SEM, knockdown of every gene: the learned graph ranks true
    edges far above chance (AUPRC vs the edge density), over the graph's genes."""
    adata = cyclic_graph(seed=1, n_genes=10, cells_per_perturbation=120, n_control_cells=240)
    data = pp.PerturbationData.from_anndata(adata)
    run = pp.fit(data, model="nodags", max_epochs=40, early_stopping_patience=None, progress=False, device="cpu", seed=0)
    truth = adata.varp["true_adjacency"][:10, :10]
    weights = contract.adjacency(run.model).weights[:10, :10]
    density = float((truth != 0)[~np.eye(10, dtype=bool)].mean())
    auprc = edge_auprc(truth, weights)
    assert auprc > density + 0.4, (auprc, density)
    assert np.isfinite(run.iwelbo(data, "test", num_particles=2)).all()
    # effects go through the graph: a knockdown lowers its gene (learned level), and an
    # unseen double lowers both of its genes
    ate = run.ate(["gene_00", "gene_00+gene_03"], num_particles=50)
    assert ate.loc["gene_00", "gene_00"] < -1.0
    assert ate.loc["gene_00+gene_03", ["gene_00", "gene_03"]].max() < -1.0
