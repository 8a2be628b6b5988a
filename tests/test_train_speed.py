"""Speed-ups of the training step keep the math: the count likelihoods equal
Pyro's distributions, split encoders equal concatenated ones, the engine's
``validate_distributions`` option changes no number."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_perturb as pp
from pyro_perturb.data import Batch
from pyro_perturb.likelihoods import CountLikelihood, NegativeBinomialCounts, PoissonCounts
from pyro_perturb.nn import MLP, GaussianEncoder, broadcast_cat
from pyro_perturb.registry import build


def _counts(shape, seed=0, large=1_000.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(shape, generator=g) * 30)
    x[0] = 0.0  # a cell of zeros
    x[1, 0] = large  # a large count
    return x


@pytest.mark.parametrize("theta_shape", [(7,), (5, 7), ()])
def test_nb_log_prob_and_gradients_equal_pyro(theta_shape):
    g = torch.Generator().manual_seed(1)
    theta = (torch.rand(theta_shape, generator=g) * 20 + 1e-3).requires_grad_()
    logits = (torch.randn(3, 5, 7, generator=g) * 4).requires_grad_()  # (particles, cells, genes)
    x = _counts((5, 7))
    ours = NegativeBinomialCounts(theta, logits=logits).to_event(1).log_prob(x)
    pyros = dist.NegativeBinomial(total_count=theta, logits=logits).to_event(1).log_prob(x)
    assert ours.shape == pyros.shape == (3, 5)
    torch.testing.assert_close(ours, pyros, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(ours.sum(), [theta, logits]), torch.autograd.grad(pyros.sum(), [theta, logits])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_nb_log_prob_without_grad_equals_with_grad():
    # evaluation takes an in-place path
    theta, logits = torch.rand(7) * 5 + 0.1, torch.randn(3, 5, 7)
    x = _counts((5, 7))
    lik = CountLikelihood(7)
    library = x.sum(-1).clamp(min=1.0)
    with_grad = lik.distribution(logits, library).log_prob(x)
    with torch.no_grad():
        without = lik.distribution(logits, library).log_prob(x)
        torch.testing.assert_close(NegativeBinomialCounts(theta, logits=logits).log_prob(x),
                                   dist.NegativeBinomial(total_count=theta, logits=logits).log_prob(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(without, with_grad.detach())


def test_nb_huge_counts_are_as_accurate_as_pyros():
    # at x ~ 5e4 the lgamma terms (~5e5) cancel in float32: both lose ~1e-2 nats
    theta = torch.tensor([0.3, 5.0, 30.0])
    logits = torch.randn(4, 2, 3)
    x = torch.tensor([[50_000.0, 120_000.0, 7.0], [0.0, 90_000.0, 3.0]])
    exact = dist.NegativeBinomial(total_count=theta.double(), logits=logits.double()).log_prob(x.double())
    ours = NegativeBinomialCounts(theta, logits=logits).log_prob(x).double()
    pyros = dist.NegativeBinomial(total_count=theta, logits=logits).log_prob(x).double()
    assert (ours - exact).abs().max() <= 3 * (pyros - exact).abs().max() + 1e-3


def test_nb_zero_count_has_zero_lgamma_terms_and_matches_pyro_elementwise():
    theta = torch.tensor([0.5, 2.0, 40.0])
    logits = torch.tensor([[-3.0, 0.0, 3.0]])
    x = torch.zeros(1, 3)
    expected = dist.NegativeBinomial(total_count=theta, logits=logits).log_prob(x)
    torch.testing.assert_close(NegativeBinomialCounts(theta, logits=logits).log_prob(x), expected)
    # at x = 0: log p = theta * logsigmoid(-logits) exactly
    torch.testing.assert_close(expected, theta * torch.nn.functional.logsigmoid(-logits))


def test_nb_expand_sample_and_moments_are_pyros():
    theta, logits = torch.tensor([1.0, 5.0]), torch.tensor([[0.5, -1.0]])
    ours = NegativeBinomialCounts(theta, logits=logits)
    ref = dist.NegativeBinomial(total_count=theta, logits=logits)
    expanded = ours.expand((4, 1, 2))
    assert isinstance(expanded, NegativeBinomialCounts) and expanded.batch_shape == (4, 1, 2)
    x = torch.tensor([[3.0, 0.0]])
    torch.testing.assert_close(expanded.log_prob(x), ref.expand((4, 1, 2)).log_prob(x))
    torch.testing.assert_close(ours.mean, ref.mean)
    torch.testing.assert_close(ours.variance, ref.variance)
    torch.manual_seed(0)
    draws = ours.sample((20_000,))
    torch.testing.assert_close(draws.mean(0), ref.mean, rtol=0.05, atol=0.05)


def test_poisson_log_prob_equals_pyro():
    rate = (torch.rand(3, 5, 7) * 10 + 1e-3).requires_grad_()
    x = _counts((5, 7))
    ours = PoissonCounts(rate).to_event(1).log_prob(x)
    pyros = dist.Poisson(rate).to_event(1).log_prob(x)
    torch.testing.assert_close(ours, pyros)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), rate)[0], torch.autograd.grad(pyros.sum(), rate)[0])
    assert isinstance(PoissonCounts(rate).expand((2, 3, 5, 7)), PoissonCounts)


@pytest.mark.parametrize("kind", ["nb", "poisson"])
def test_count_likelihood_scores_like_pyro(kind):
    lik = CountLikelihood(7, kind)
    gene_logits = torch.randn(3, 5, 7)
    x = _counts((5, 7))
    library = x.sum(-1).clamp(min=1.0)
    log_rate = library.log().unsqueeze(-1) + torch.log_softmax(gene_logits, -1)
    ref = (
        dist.NegativeBinomial(total_count=lik.theta, logits=log_rate - lik.log_theta)
        if kind == "nb"
        else dist.Poisson(log_rate.exp())
    ).to_event(1)
    torch.testing.assert_close(lik.distribution(gene_logits, library).log_prob(x), ref.log_prob(x), rtol=1e-5, atol=1e-4)


def test_mlp_forward_parts_equals_concatenation():
    torch.manual_seed(0)
    mlp = MLP(6 + 3, [16, 8], 4)
    cells = torch.randn(5, 6)  # no particle dims
    per_particle = torch.randn(2, 5, 3)  # (P, B, 3)
    expected = mlp(broadcast_cat([cells, per_particle]))
    torch.testing.assert_close(mlp.forward_parts([cells, per_particle]), expected)
    enc = GaussianEncoder(9, [16], 4)
    for a, b in zip(enc.forward_parts([cells, per_particle]), enc(broadcast_cat([cells, per_particle]))):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="do not add up"):
        mlp.forward_parts([cells, per_particle[..., :2]])


def test_correlated_guide_split_encoder_equals_concatenated(tiny_data):
    _, guide, _ = build("sams_vae", tiny_data.spec, {"n_latent": 4, "n_hidden": 16}, gene_stats=tiny_data.gene_stats())
    batch = tiny_data.batch(np.arange(32))
    offset = torch.randn(3, 32, 4)
    loc, scale = guide._basal(batch, offset)
    ref_loc, ref_scale = guide.encoder(broadcast_cat([guide.normalizer(batch.x), offset]))
    torch.testing.assert_close(loc, ref_loc)
    torch.testing.assert_close(scale, ref_scale)
    M = torch.bernoulli(torch.full((3, 1, guide.n_treatments, 4), 0.5))
    eye = torch.eye(guide.n_treatments)
    for a, b in zip(guide._effect_params(M), guide.effect_encoder(broadcast_cat([M, eye]))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "model, sizes",
    [("sams_vae", dict(n_latent=4, num_particles=2)), ("fcr", dict(n_latent_x=3, n_latent_t=3, n_latent_tx=3))],
)
def test_validate_distributions_option_changes_no_number(tiny_data, model, sizes):
    """fcr: also the adversary's step runs under the option."""
    runs = []
    for validate in (True, False):
        pyro.set_rng_seed(0)
        runs.append(
            pp.fit(tiny_data, model=model, n_hidden=16, batch_size=64, max_epochs=2,
                   validate_distributions=validate, **sizes)
        )
    assert [r["train_loss"] for r in runs[0].history] == [r["train_loss"] for r in runs[1].history]
    assert [r["val_loss"] for r in runs[0].history] == [r["val_loss"] for r in runs[1].history]
