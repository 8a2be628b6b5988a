"""Amortised guide of the conditional VAE (:mod:`pyro_perturb.models.cvae`).

``q(z_i | x_i, d_i, c_i) = Normal(enc([standardise(log1p x_i), d_i, onehot(c_i)]))``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..nn import ExpressionNormalizer, GaussianEncoder, covariate_onehot


class ConditionalVAEGuide(PyroModule):
    """q(z | x, d, c); same signature as the model."""

    def __init__(
        self, spec: DataSpec, n_latent: int = 100, n_hidden: int = 400, n_layers: int = 1
    ) -> None:
        super().__init__()
        self.spec = spec
        self.normalizer = ExpressionNormalizer(spec.n_genes)
        n_cov = sum(spec.covariate_sizes)
        self.encoder = GaussianEncoder(
            spec.n_genes + spec.n_perturbations + n_cov, [n_hidden] * n_layers, n_latent
        )

    def _posterior(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.cat(
            [self.normalizer(batch.x), batch.d, covariate_onehot(batch.c, self.spec.covariate_sizes)], dim=-1
        )
        return self.encoder(inputs)

    def forward(self, batch: Batch, observe: bool = True):
        if batch.x is None:
            # posterior predictive without observations: z then comes from the prior
            return
        loc, scale = self._posterior(batch)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=batch.kl_weight):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Posterior means: ``{"X_latent": (B, L)}``."""
        return {"X_latent": self._posterior(batch)[0]}
