"""scVI (models/scvi.py, guides/scvi.py), the zero-inflated NB and the library prior
(likelihoods.py); the zoo contract itself is checked by test_zoo_contract.py."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch

import pyro_perturb as pp
from pyro_perturb import contract
from pyro_perturb.data import PerturbationData, simulate
from pyro_perturb.likelihoods import CountLikelihood, LibraryPrior, NegativeBinomialCounts, ZeroInflatedNegativeBinomialCounts
from pyro_perturb.registry import build

TINY = {"n_latent": 4, "n_hidden": 32}


@pytest.fixture(scope="module")
def fact_adata():
    return simulate.factorized(seed=0, n_covariates=3, n_treatments=3, cells_per_group=40, n_genes=40,
                               n_heldout_pairs=1, hidden=16)


@pytest.fixture()
def fact_data(fact_adata):
    return PerturbationData.from_anndata(fact_adata, covariate_keys=["cell_line"])


def _nb_log_pmf(x: float, mu: float, theta: float) -> float:
    """log NB(x; mean mu, inverse dispersion theta), by hand."""
    return (math.lgamma(x + theta) - math.lgamma(theta) - math.lgamma(x + 1)
            + theta * math.log(theta / (theta + mu)) + x * math.log(mu / (theta + mu)))


def test_zinb_log_prob_matches_a_hand_computation():
    mu, theta, pi = torch.tensor([[3.0, 0.5, 12.0]]), torch.tensor([2.0, 0.7, 9.0]), torch.tensor([[0.3, 0.8, 0.05]])
    x = torch.tensor([[0.0, 0.0, 7.0]])
    d = ZeroInflatedNegativeBinomialCounts(theta, (mu / theta).log(), torch.logit(pi))
    got = d.log_prob(x)[0].tolist()
    for g, value in enumerate(got):
        nb = _nb_log_pmf(float(x[0, g]), float(mu[0, g]), float(theta[g]))
        p = float(pi[0, g])
        want = math.log(p + (1 - p) * math.exp(nb)) if x[0, g] == 0 else math.log(1 - p) + nb
        assert value == pytest.approx(want, abs=1e-5)
    torch.testing.assert_close(d.mean, (1 - pi) * mu)


def test_zinb_reduces_to_nb_without_zero_inflation():
    torch.manual_seed(0)
    gene_logits, library = torch.randn(5, 8), torch.full((5,), 200.0)
    x = torch.poisson(torch.full((5, 8), 20.0))
    x[0, :3] = 0.0
    nb, zinb = CountLikelihood(8, "nb"), CountLikelihood(8, "zinb")
    zero_logits = torch.full((5, 8), -40.0)
    torch.testing.assert_close(zinb.distribution(gene_logits, library, zero_logits).log_prob(x),
                               nb.distribution(gene_logits, library).log_prob(x))
    torch.testing.assert_close(zinb.mean(gene_logits, library, zero_logits), nb.mean(gene_logits, library))
    with pytest.raises(ValueError, match="'zinb' likelihood needs zero-inflation logits"):
        zinb.distribution(gene_logits, library)
    with pytest.raises(ValueError, match="zero_logits are for the 'zinb' likelihood, not 'nb'"):
        nb.distribution(gene_logits, library, zero_logits)


def test_gene_group_dispersion_selects_each_cells_row():
    lik = CountLikelihood(3, "nb", n_groups=2)
    with torch.no_grad():
        lik.log_theta.copy_(torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))
    fn = lik.distribution(torch.zeros(2, 3), torch.ones(2), groups=torch.tensor([1, 0]))
    base = fn.base_dist
    assert isinstance(base, NegativeBinomialCounts)
    torch.testing.assert_close(base.total_count, torch.tensor([[3.0, 4.0, 5.0], [0.0, 1.0, 2.0]]).exp())
    with pytest.raises(ValueError, match="pass each cell's group code"):
        lik.distribution(torch.zeros(2, 3), torch.ones(2))


def test_latent_library_prior_uses_per_batch_statistics(fact_data, tmp_path):
    run = pp.fit(fact_data, model="scvi", out=None, max_epochs=1, batch_size=64, progress=False, device="cpu",
                 library="latent", **TINY)
    prior = run.model.library_prior
    train = fact_data.indices("train")
    log_library = np.log(fact_data.library[train].astype(np.float64))
    codes = fact_data.covariates[train, 0]
    assert len(prior.loc) == fact_data.spec.covariate_sizes[0] == 3
    for b in range(3):
        assert prior.loc[b].item() == pytest.approx(log_library[codes == b].mean(), rel=1e-5)
        assert prior.scale[b].item() == pytest.approx(log_library[codes == b].std(), rel=1e-4)
    # the guide starts q(log l) at the data's depth
    bias = run.guide.library_encoder.net[-1].bias[0].item()
    assert abs(bias - log_library.mean()) < 1.0
    # the prior is a pair of buffers: saved with the weights
    assert {"library_prior.loc", "library_prior.scale"} <= set(run.model.state_dict())


def test_library_prior_refuses_bad_codes():
    prior = LibraryPrior(2)
    with pytest.raises(ValueError, match=r"batch codes must lie in \[0, 2\)"):
        prior.set_from_data(np.array([10.0, 20.0]), np.array([0, 2]))
    prior.set_from_data(np.array([10.0, 20.0, 30.0]), np.array([0, 0, 0]))  # batch 1 empty: pooled
    assert prior.loc[1].item() == pytest.approx(prior.loc[0].item())


def _baseline_heldout_loglik(data: PerturbationData) -> float:
    """Mean held-out log-likelihood of the best latent-free NB: per batch gene proportions
    and per gene theta (grid search) fitted on training cells."""
    train, test = data.indices("train"), data.indices("test")
    x_train, x_test = (torch.as_tensor(data.read_counts(i), dtype=torch.float64) for i in (train, test))
    b_train, b_test = (torch.as_tensor(data.covariates[i, 0]) for i in (train, test))
    rho = torch.stack([x_train[b_train == b].sum(0) / x_train[b_train == b].sum() for b in range(int(b_train.max()) + 1)])
    rho = rho.clamp_min(1e-8)

    def loglik(x, codes, theta):
        mu = x.sum(-1, keepdim=True) * rho[codes]
        return torch.distributions.NegativeBinomial(theta, logits=(mu / theta).log()).log_prob(x)

    grid = torch.logspace(-1, 3, 41, dtype=torch.float64)
    scores = torch.stack([loglik(x_train, b_train, t).sum(0) for t in grid])  # (grid, G)
    theta = grid[scores.argmax(0)]
    return float(loglik(x_test, b_test, theta).sum(-1).mean())


def _clustered_data(seed: int = 0, n_cells: int = 400, n_genes: int = 40, n_types: int = 3) -> PerturbationData:
    """Unperturbed NB counts of hidden cell types (unobserved: only a latent finds them)
    in two observed batches, each with its own gene proportions."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    types, batch = rng.integers(n_types, size=n_cells), rng.integers(2, size=n_cells)
    logits = 1.5 * rng.normal(size=(n_types, n_genes))[types] + 0.5 * rng.normal(size=(2, n_genes))[batch]
    rho = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mu = rng.lognormal(np.log(500.0), 0.3, size=n_cells)[:, None] * rho
    x = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)
    obs = pd.DataFrame({"perturbation": pd.Categorical(["control"] * n_cells),
                        "batch": pd.Categorical(np.array(["a", "b"])[batch])}, index=[str(i) for i in range(n_cells)])
    return PerturbationData.from_anndata(ad.AnnData(x, obs=obs), covariate_keys=["batch"])


def test_short_fit_learns_and_beats_a_latent_free_baseline():
    data = _clustered_data()
    run = pp.fit(data, model="scvi", out=None, max_epochs=20, batch_size=64, lr=1e-2, progress=False, device="cpu",
                 seed=0, early_stopping_patience=None, **TINY)
    losses = [r["train_loss"] for r in run.history]
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    heldout = run.iwelbo(data, "test", num_particles=10).mean()
    baseline = _baseline_heldout_loglik(data)  # about -122 per cell; scVI about -105
    assert heldout > baseline + 5.0, (heldout, baseline)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("likelihood", "foo", "likelihood of model 'scvi' must be one of 'nb', 'zinb', 'poisson', got 'foo'"),
        ("likelihood", "gaussian", "likelihood of model 'scvi' must be one of 'nb', 'zinb', 'poisson', got 'gaussian'"),
        ("library", "fixed", "library of model 'scvi' must be one of 'observed', 'latent', got 'fixed'"),
        ("dispersion", "cell", "dispersion of model 'scvi' must be one of 'gene', 'gene-batch', got 'cell'"),
        ("dropout_rate", 1.5, r"dropout_rate of model 'scvi' must be a finite number in \[0, 1\], got 1.5"),
        ("dropout_rate", 1.0, r"scVI's dropout_rate must be in \[0, 1\), got 1.0"),
        ("n_latent", 0, "n_latent of model 'scvi' must be a positive integer, got 0"),
    ],
)
def test_bad_hyperparameters_are_refused(key, value, message, fact_data):
    with pytest.raises(ValueError, match=message):
        build("scvi", fact_data.spec, {key: value})


def test_gene_batch_dispersion_needs_a_batch_covariate(fact_adata):
    no_batch = PerturbationData.from_anndata(fact_adata)
    with pytest.raises(ValueError, match="dispersion='gene-batch' needs a batch covariate"):
        build("scvi", no_batch.spec, {"dispersion": "gene-batch"})


@pytest.mark.parametrize("hparams", [
    {"likelihood": "zinb", "library": "latent", "dispersion": "gene-batch"},
    {"likelihood": "poisson", "use_perturbation": True},
])
def test_options_meet_the_contract(hparams, fact_data):
    pyro.set_rng_seed(0)
    model, guide, full = build("scvi", fact_data.spec, {**TINY, **hparams})
    contract.init_from_data(model, guide, fact_data)
    batch = fact_data.batch(fact_data.indices("train")[:12], n_cells=len(fact_data.indices("train")))
    contract.check_pair(model, guide, batch)
    assert contract.likelihood_kind(model) == full["likelihood"]
    assert contract.uses_dosage(model) is full["use_perturbation"]
    latents = guide.posterior_latents(batch)
    assert set(latents) == {"X_latent"} and latents["X_latent"].shape == (12, 4)


def test_ate_is_skipped_for_plain_scvi_and_computed_with_the_dosage(fact_data):
    plain = pp.fit(fact_data, model="scvi", out=None, max_epochs=1, batch_size=64, progress=False, device="cpu", **TINY)
    results = plain.evaluate(fact_data, num_particles=2, ate_plots=False, ate_ppc=False)
    assert "zero by construction" in results["ate"]["skipped"]
    dosed = pp.fit(fact_data, model="scvi", out=None, max_epochs=1, batch_size=64, progress=False, device="cpu",
                   use_perturbation=True, likelihood="zinb", **TINY)
    results = dosed.evaluate(fact_data, num_particles=2, ate_plots=False, ate_ppc=False, ate_particles=4)
    assert "skipped" not in results["ate"] and np.isfinite(results["ate"]["all"]["ate_pearson"])
