"""Count likelihoods shared by every model: ``x_ig ~ NB(l_i * softmax(f(z_i))_g, theta_g)``.

The decoder returns unnormalised gene logits ``f(z)``; the library size ``l_i`` is
observed. The NB is parameterised as Pyro's ``NegativeBinomial(total_count=theta,
logits=log l + log_softmax(f) - log theta)``, whose mean is ``l * softmax(f)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn

LIKELIHOODS = ("nb", "poisson", "gaussian")


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
        log_rate = library.log().unsqueeze(-1) + torch.log_softmax(gene_logits, dim=-1)
        if self.kind == "poisson":
            return dist.Poisson(log_rate.exp()).to_event(1)
        return dist.NegativeBinomial(
            total_count=self.theta, logits=log_rate - self.log_theta
        ).to_event(1)

    def transform_observation(self, x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """What the likelihood scores: counts, or log-normalised expression (Gaussian)."""
        if self.kind == "gaussian":
            return torch.log1p(1e4 * x / library.unsqueeze(-1))
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
