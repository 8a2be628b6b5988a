"""Amortised guide of the comparative VAEs (:mod:`pyro_perturb.models.comparative`).

Two encoders of the normalised expression and the covariates, one per block::

    q(z_b | x, c) = Normal(enc_b([standardise(log1p x), onehot(c)]))          every cell
    q(z_s | x, c) = Normal(enc_s([standardise(log1p x), onehot(c)]))          target cells
                    point mass at 0                                           controls

Neither encoder sees the perturbation label (only whether the cell is a control, which
selects the point mass), so whatever perturbation identity the latents carry was found in
the counts.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..models.comparative import BACKGROUND_SITE, SALIENT_SITE, is_target, salient_distribution
from ..nn import ExpressionNormalizer, GaussianEncoder, covariate_onehot


class ComparativeGuide(PyroModule):
    """q(z_b | x, c) q(z_s | x, c, t); same signature as the model."""

    def __init__(
        self, spec: DataSpec, n_background: int = 10, n_salient: int = 5, n_hidden: int = 128, n_layers: int = 1
    ) -> None:
        super().__init__()
        self.spec = spec
        self.normalizer = ExpressionNormalizer(spec.n_genes)
        n_in = spec.n_genes + sum(spec.covariate_sizes)
        self.background_encoder = GaussianEncoder(n_in, [n_hidden] * n_layers, n_background)
        self.salient_encoder = GaussianEncoder(n_in, [n_hidden] * n_layers, n_salient)

    def posterior(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"background": (loc, scale) (B, Lb), "salient": (loc, scale) (B, Ls)}``; the
        salient encoder's output for every cell (controls' rows are not used)."""
        inputs = torch.cat([self.normalizer(batch.x), covariate_onehot(batch.c, self.spec.covariate_sizes)], dim=-1)
        return {"background": self.background_encoder(inputs), "salient": self.salient_encoder(inputs)}

    def forward(self, batch: Batch, observe: bool = True):
        if batch.x is None:
            # posterior predictive without observations: both blocks then come from the prior
            return
        post = self.posterior(batch)
        target = is_target(batch)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=batch.kl_weight):
                pyro.sample(BACKGROUND_SITE, dist.Normal(*post["background"]).to_event(1))
                pyro.sample(SALIENT_SITE, salient_distribution(target, *post["salient"]))

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Posterior means: ``{"X_latent": (B, Lb + Ls), "X_background": (B, Lb),
        "X_salient": (B, Ls)}``, salient rows of controls exactly 0."""
        post = self.posterior(batch)
        background = post["background"][0]
        salient = post["salient"][0] * is_target(batch).unsqueeze(-1).to(background.dtype)
        return {"X_latent": torch.cat([background, salient], dim=-1), "X_background": background, "X_salient": salient}
