"""The integrated log-normalised expression (evaluate/expected_lognorm.py) against exact
enumeration and Monte Carlo, its conventions, shapes and input checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pyro_perturb.evaluate.expected_lognorm import (
    count_parameters,
    exact_expected_log_normalized,
    expected_log_normalized,
    expected_log_normalized_counts,
)
from pyro_perturb.likelihoods import CountLikelihood

from .devices import run_device_clean

SCALE = 1e4


def _profile(genes, library, theta_range, seed, spread=1.5, dominant=4.0):
    """Expected counts ``library * rho`` (log-normal rho with three dominant genes) and a
    log-uniform theta (None: Poisson), float64."""
    rng = np.random.default_rng(seed)
    log_rho = rng.normal(0.0, spread, genes)
    log_rho[:3] += dominant
    rho = np.exp(log_rho - log_rho.max())
    mean = torch.tensor(library * rho / rho.sum())
    if theta_range is None:
        return mean, None
    lo, hi = theta_range
    return mean, torch.tensor(np.exp(rng.uniform(math.log(lo), math.log(hi), genes)))


def _log_normalized(x):
    """The sampler's statistic: log2(1 + s x / T), T clamped to >= 1 (as the model ATE)."""
    total = x.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.log2(1.0 + x / total * SCALE)


def _nb_pmf(mean, theta, size):
    k = torch.arange(size, dtype=torch.float64)
    if theta is None:
        return torch.distributions.Poisson(mean).log_prob(k).exp()
    return torch.distributions.NegativeBinomial(theta, logits=(mean / theta).log()).log_prob(k).exp()


@pytest.mark.parametrize("mean,theta", [
    ([0.05, 0.1, 0.02], [0.5, 2.0, 5.0]),  # P(T = 0) ~ 0.85: the clamp convention matters
    ([0.7, 2.0, 0.3], [0.5, 3.0, 10.0]),
    ([1.5, 0.2, 4.0], None),
])
def test_joint_enumeration_tiny(mean, theta):
    """Three genes, the joint pmf summed over a box holding all but 1e-12 of the mass."""
    mean = torch.tensor(mean, dtype=torch.float64)
    theta = None if theta is None else torch.tensor(theta, dtype=torch.float64)
    size = 8
    while True:
        pmfs = [_nb_pmf(mean[g], None if theta is None else theta[g], size) for g in range(3)]
        if all(float(p.sum()) > 1 - 1e-12 for p in pmfs):
            break
        size *= 2
    grid = torch.tensor(list(itertools.product(range(size), repeat=3)), dtype=torch.float64)
    prob = pmfs[0][grid[:, 0].long()] * pmfs[1][grid[:, 1].long()] * pmfs[2][grid[:, 2].long()]
    enumerated = prob @ _log_normalized(grid)
    assert torch.allclose(exact_expected_log_normalized(mean, theta), enumerated, atol=1e-10, rtol=0)
    for tol in (1e-3, 1e-6):
        assert (expected_log_normalized(mean, theta, tol=tol) - enumerated).abs().max() < tol


def test_single_gene_is_closed_form():
    """With one gene T = x: the value is P(x > 0) log2(1 + s)."""
    mean = torch.tensor([[0.01], [0.5], [30.0], [2e4]], dtype=torch.float64)
    theta = torch.tensor([0.7], dtype=torch.float64)
    p_zero = (1 + mean / theta) ** -theta
    expected = (1 - p_zero) * math.log2(1 + SCALE)
    assert (expected_log_normalized(mean, theta) - expected).abs().max() < 1e-6
    expected = -torch.expm1(-mean) * math.log2(1 + SCALE)
    assert (expected_log_normalized(mean, None) - expected).abs().max() < 1e-6


@pytest.mark.parametrize("library,theta_range,genes", [
    (120.0, (0.5, 20.0), 250),
    (120.0, None, 250),
    (20.0, (0.05, 2.0), 100),
    (1000.0, (0.5, 20.0), 120),
])
def test_exact_summation_shallow(library, theta_range, genes):
    """Against exact summation over the pmfs: error below tol in float64 (tol 1e-3 and
    1e-6), and within float rounding of that in float32."""
    mean, theta = _profile(genes, library, theta_range, seed=0)
    exact = exact_expected_log_normalized(mean, theta)
    for tol in (1e-3, 1e-6):
        assert (expected_log_normalized(mean, theta, tol=tol) - exact).abs().max() < tol
    value32 = expected_log_normalized(mean.float(), None if theta is None else theta.float())
    assert value32.dtype == torch.float32
    assert (value32.double() - exact).abs().max() < 5e-6


@pytest.mark.parametrize("library,theta_range,genes,draws", [
    (120.0, (0.5, 20.0), 250, 20000),  # shallow: T fluctuates a lot relative to its mean
    (1e4, (0.5, 20.0), 1000, 4000),  # deep
    (120.0, None, 250, 20000),  # Poisson
])
def test_monte_carlo(library, theta_range, genes, draws):
    """Against the sampler itself: per gene within 4.5 Monte Carlo standard errors, and
    the mean squared z-score near 1 (no systematic bias hiding under the max)."""
    mean, theta = _profile(genes, library, theta_range, seed=1, spread=1.0)
    torch.manual_seed(2)
    if theta is None:
        x = torch.poisson(mean.expand(draws, genes))
    else:
        x = torch.distributions.NegativeBinomial(theta, logits=(mean / theta).log()).sample((draws,))
    stat = _log_normalized(x)
    mc_mean, mc_se = stat.mean(0), stat.std(0) / math.sqrt(draws)
    assert bool((mc_se > 0).all())
    z = (expected_log_normalized(mean, theta) - mc_mean) / mc_se
    assert z.abs().max() < 4.5
    assert abs(float((z**2).mean()) - 1.0) < 4 * math.sqrt(2.0 / genes)


def test_float32_rows_libraries_and_batch_independence():
    """Per-row libraries from 20 to 1e5 in one call: each row as computed alone, whatever
    the other rows and the chunking (each cell's nodes depend only on that cell)."""
    mean, theta = _profile(1187, 1.0, (0.5, 20.0), seed=3)
    libraries = torch.tensor([20.0, 150.0, 3e3, 1e4, 1e5], dtype=torch.float64)
    rows = (libraries.unsqueeze(-1) * mean).float()
    for th in (theta.float(), None):
        batch = expected_log_normalized(rows, th)
        for i in range(len(libraries)):
            assert torch.equal(expected_log_normalized(rows[i], th), batch[i])
        assert torch.equal(expected_log_normalized(rows, th, chunk_elements=2 * 1187), batch)
    batch = expected_log_normalized(rows, theta.float())
    value64 = expected_log_normalized(rows.double(), theta)
    assert (batch.double() - value64).abs().max() < 5e-6
    # deeper cells resolve more of the low-expressed genes
    assert bool((batch[1:].sum(-1) > batch[:-1].sum(-1)).all())


def test_theta_forms_and_leading_dims():
    mean, theta = _profile(40, 200.0, (0.5, 20.0), seed=4)
    means = mean * torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)  # (3, 40)
    means = means.expand(2, 3, 40)  # (particles, rows, genes)
    ref = expected_log_normalized(means, theta)
    assert ref.shape == (2, 3, 40)
    assert torch.equal(expected_log_normalized(means, theta.expand(2, 3, 40)), ref)
    assert torch.equal(expected_log_normalized(means, theta.unsqueeze(0)), ref)
    assert torch.allclose(expected_log_normalized(means, theta.expand(3, 40).clone()), ref, atol=1e-12, rtol=0)
    scalar = expected_log_normalized(mean, 3.0)
    assert torch.allclose(scalar, expected_log_normalized(mean, torch.full((40,), 3.0, dtype=torch.float64)))
    poisson = expected_log_normalized(mean, None)
    assert (expected_log_normalized(mean, torch.full((40,), math.inf, dtype=torch.float64)) - poisson).abs().max() < 1e-6
    mixed = theta.clone()
    mixed[::2] = math.inf
    assert torch.isfinite(expected_log_normalized(mean, mixed)).all()
    # a gene (or a whole cell) with mean 0 contributes 0 and is 0
    zeros = means.clone()
    zeros[0, 0] = 0.0
    zeros[1, :, 5] = 0.0
    out = expected_log_normalized(zeros, theta)
    assert bool((out[0, 0] == 0).all()) and bool((out[1, :, 5] == 0).all())
    assert expected_log_normalized(torch.zeros(0, 40), None).shape == (0, 40)
    half = expected_log_normalized(mean.to(torch.bfloat16), None)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.double(), expected_log_normalized(mean.to(torch.bfloat16).double(), None), atol=0.05)


def test_count_distributions_of_the_likelihood():
    gene_logits = torch.randn(2, 3, 25)
    library = torch.tensor([150.0, 1e4, 4e4])
    nb = CountLikelihood(25, "nb")
    with torch.no_grad():
        nb.log_theta.copy_(torch.linspace(-1.0, 3.0, 25))
        fn = nb.distribution(gene_logits, library)
    mean, theta = count_parameters(fn)
    assert theta.shape == (25,)  # the compact theta, not the broadcast copy
    expected_mean = library.unsqueeze(-1) * torch.softmax(gene_logits, -1)
    assert torch.allclose(mean, expected_mean, rtol=1e-5)
    value = expected_log_normalized_counts(fn)
    assert value.shape == (2, 3, 25)
    assert torch.allclose(value, expected_log_normalized(expected_mean, nb.theta.detach()), atol=1e-5)
    poisson = CountLikelihood(25, "poisson").distribution(gene_logits, library)
    assert count_parameters(poisson)[1] is None
    assert torch.allclose(expected_log_normalized_counts(poisson), expected_log_normalized(expected_mean, None), atol=1e-5)
    with pytest.raises(ValueError, match="NegativeBinomial or Poisson"):
        count_parameters(CountLikelihood(25, "gaussian").distribution(gene_logits, library))


def test_default_device_clean():
    mean, theta = _profile(30, 100.0, (0.5, 20.0), seed=5)
    out = run_device_clean(expected_log_normalized, mean.float().expand(4, 30), theta.float())
    assert out.device.type == "cpu" and torch.isfinite(out).all()


def test_input_checks():
    mean = torch.full((2, 5), 3.0)
    with pytest.raises(ValueError, match="floating-point"):
        expected_log_normalized(torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="finite and >= 0"):
        expected_log_normalized(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        expected_log_normalized(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="theta must be > 0"):
        expected_log_normalized(mean, torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="does not broadcast"):
        expected_log_normalized(mean, torch.ones(4))
    with pytest.raises(ValueError, match="would broadcast mean"):
        expected_log_normalized(mean, torch.ones(3, 2, 5))
    with pytest.raises(ValueError, match="tol"):
        expected_log_normalized(mean, None, tol=0.5)
    with pytest.raises(ValueError, match="scale"):
        expected_log_normalized(mean, None, scale=0.0)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., G\)"):
        expected_log_normalized(torch.tensor(3.0))
