"""Count likelihoods shared by every model: ``x_ig ~ NB(l_i * softmax(f(z_i))_g, theta_g)``.

The decoder returns unnormalised gene logits ``f(z)``; the library size ``l_i`` is
observed. The NB is parameterised as Pyro's ``NegativeBinomial(total_count=theta,
logits=log l + log_softmax(f) - log theta)``, whose mean is ``l * softmax(f)``.

The count distributions are :class:`NegativeBinomialCounts` and :class:`PoissonCounts`:
Pyro's ``NegativeBinomial`` and ``Poisson`` with the same values, samples and moments,
whose ``log_prob`` computes the terms that depend only on the counts and ``theta``
(``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``, and its ``digamma`` gradient)
once per cell and gene instead of once per ELBO / IWELBO particle. Those terms were
~30% of a SAMS-VAE training step at 5 particles (bench/results/train_throughput.md).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroParam
from torch import nn

from .normalize import log1p_normalize

LIKELIHOODS = ("nb", "poisson", "gaussian")


class NegativeBinomialCounts(dist.NegativeBinomial):
    """Pyro's ``NegativeBinomial(total_count, logits=...)`` with a cheaper ``log_prob``.

    ``total_count`` (``theta``) is kept as given (e.g. ``(G,)``) next to the broadcast
    copy, so that in::

        log p(x) = (theta + x) * logsigmoid(-logits) + x * logits
                   + lgamma(theta + x) - lgamma(theta) - lgamma(x + 1)

    the ``lgamma`` terms (and the ``digamma`` of their gradient) have the shape of
    ``broadcast(theta, x)``, e.g. ``(B, G)``, even when ``logits`` carries particle
    dimensions ``(P, B, G)``; the first line is the per-draw part, computed as
    ``x * l - (theta + x) * softplus(l)`` (one transcendental instead of two
    ``logsigmoid``, no negation pass). The values are Pyro's to float rounding
    (``tests/test_train_speed.py``); sampling and moments are inherited.

    Args:
        total_count: ``theta > 0``, any shape broadcastable with ``logits``.
        logits: log-odds, ``log(mean / theta)``.
    """

    def __init__(self, total_count: torch.Tensor, logits: torch.Tensor, validate_args=None) -> None:
        total_count = torch.as_tensor(total_count, dtype=logits.dtype, device=logits.device)
        super().__init__(total_count=total_count, logits=logits, validate_args=validate_args)
        self.compact_total_count = total_count

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomialCounts, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.compact_total_count = self.compact_total_count
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta = self.compact_total_count
        theta_plus_x = theta + value  # shape of broadcast(theta, x): no particle dims
        log_coefficient = torch.lgamma(theta_plus_x) - torch.lgamma(1.0 + value) - torch.lgamma(theta)
        # theta = x = 0 has probability 1 (lgamma(0) is infinite): Pyro's convention
        log_coefficient = log_coefficient.masked_fill(theta_plus_x == 0.0, 0.0)
        logits = self.logits
        # logsigmoid(-l) = -softplus(l); addcmul fuses the product and the difference
        if torch.is_grad_enabled():
            per_draw = torch.addcmul(value * logits, theta_plus_x, F.softplus(logits), value=-1.0)
            return per_draw + log_coefficient
        # evaluation (IWELBO, validation loss): the same in place, two fewer full-size
        # allocations (~10% of a held-out IWELBO)
        out = value * logits
        out.addcmul_(theta_plus_x, F.softplus(logits), value=-1.0)
        return out.add_(log_coefficient)


class PoissonCounts(dist.Poisson):
    """Pyro's ``Poisson(rate)`` whose ``log_prob`` computes ``lgamma(x + 1)`` at the
    counts' shape (once per cell and gene), not once per particle of ``rate``."""

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PoissonCounts, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self.is_sparse:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        return value.xlogy(self.rate) - self.rate - torch.lgamma(value + 1.0)


class CountLikelihood(PyroModule):
    """Observation model of a ``(B, G)`` matrix of counts given gene logits.

    Args:
        n_genes: G.
        kind: ``"nb"`` (default, per-gene inverse dispersion ``theta = exp(log_theta)``),
            ``"poisson"``, or ``"gaussian"`` (on ``log1p(1e4 * x / l)``, per-gene scale;
            the decoder output is then the mean of that, not a logit).
    """

    def __init__(self, n_genes: int, kind: str = "nb") -> None:
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {kind!r}; expected one of {LIKELIHOODS}")
        self.kind = kind
        if kind in ("nb", "gaussian"):
            # theta starts at e^2 ~ 7: moderate overdispersion, typical of UMI data
            init = 2.0 if kind == "nb" else 0.0
            self.log_theta = nn.Parameter(torch.full((n_genes,), init))

    @property
    def theta(self) -> torch.Tensor:
        return self.log_theta.exp()

    def distribution(self, gene_logits: torch.Tensor, library: torch.Tensor) -> dist.TorchDistribution:
        """The ``(…, B)``-batched distribution over ``(G,)`` count vectors.

        gene_logits: ``(..., B, G)``; library: ``(B,)``.
        """
        if self.kind == "gaussian":
            return dist.Normal(gene_logits, self.log_theta.exp()).to_event(1)
        log_library = library.log().unsqueeze(-1)
        if self.kind == "poisson":
            return PoissonCounts((log_library + torch.log_softmax(gene_logits, dim=-1)).exp()).to_event(1)
        # log_softmax + (log l - log theta): one full-size (particles x cells x genes) add,
        # and no full-size negation in the backward pass, instead of an add and a subtract
        logits = torch.log_softmax(gene_logits, dim=-1)
        if torch.is_grad_enabled():
            logits = logits + (log_library - self.log_theta)
        else:  # in place when no backward pass needs log_softmax's output
            logits.add_(log_library - self.log_theta)
        return NegativeBinomialCounts(self.theta, logits=logits).to_event(1)

    def transform_observation(self, x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """What the likelihood scores: counts, or log-normalised expression (Gaussian)."""
        if self.kind == "gaussian":
            return log1p_normalize(x, library)
        return x

    def observe(self, name: str, gene_logits: torch.Tensor, x: torch.Tensor | None, library: torch.Tensor):
        """``pyro.sample(name, ..., obs=x)``; call inside the ``"cells"`` plate.

        With ``x=None`` (posterior predictive) the site is sampled instead.
        """
        obs = None if x is None else self.transform_observation(x, library)
        return pyro.sample(name, self.distribution(gene_logits, library), obs=obs)

    def mean(self, gene_logits: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """Expected counts ``(..., B, G)`` (Gaussian: expected log-normalised values)."""
        if self.kind == "gaussian":
            return gene_logits
        return library.unsqueeze(-1) * torch.softmax(gene_logits, dim=-1)
