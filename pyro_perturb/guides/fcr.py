"""Amortised guide of FCR (:mod:`pyro_perturb.models.fcr`).

A shared expression embedding ``h = MLP(standardise(log1p x))`` feeds three heads::

    q(z_x  | x, c)    = Normal(enc_x([h, onehot(c)]))
    q(z_t  | x, d)    = Normal(enc_t([h, d]))
    q(z_tx | x, c, d) = Normal(enc_tx([h, onehot(c), d]))

With ``batch.x is None`` (posterior predictive, counterfactuals) the guide samples
nothing: the blocks then come from the model's conditional priors.
"""

from __future__ import annotations

import weakref

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from ..data import Batch, DataSpec
from ..nn import MLP, ExpressionNormalizer, GaussianEncoder, covariate_onehot

BLOCKS = ("z_x", "z_t", "z_tx")


class FCRGuide(PyroModule):
    """q(z_x | x, c) q(z_t | x, d) q(z_tx | x, c, d); same signature as the model."""

    def __init__(
        self,
        spec: DataSpec,
        n_latent_x: int = 8,
        n_latent_t: int = 8,
        n_latent_tx: int = 8,
        n_hidden: int = 256,
        omega_kl: float = 1.0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.omega_kl = float(omega_kl)
        self.normalizer = ExpressionNormalizer(spec.n_genes)
        n_cov = sum(spec.covariate_sizes)
        T = spec.n_perturbations
        self.trunk = nn.Sequential(MLP(spec.n_genes, [n_hidden], n_hidden), nn.ReLU())
        self.enc_x = GaussianEncoder(n_hidden + n_cov, [n_hidden], n_latent_x)
        self.enc_t = GaussianEncoder(n_hidden + T, [n_hidden], n_latent_t)
        self.enc_tx = GaussianEncoder(n_hidden + n_cov + T, [n_hidden], n_latent_tx)
        # (weak reference to the batch, posterior, graph state) of the last forward
        self._last = None

    def cached_posterior(self, batch: Batch, differentiable: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`posterior` of ``batch``, reusing the one of the last ``forward`` on this very
        batch object when possible: with ``differentiable`` only while its autograd graph is
        unused (no backward through it yet), otherwise its values (detached)."""
        last = self._last
        if last is not None and last[0]() is batch:
            ref, post, state = last
            if not differentiable:
                return {k: (loc.detach(), scale.detach()) for k, (loc, scale) in post.items()}
            if state["graph"]:
                return post
        return self.posterior(batch)

    def posterior(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"z_x": (loc, scale), "z_t": ..., "z_tx": ...}``, each ``(B, L_block)``."""
        h = self.trunk(self.normalizer(batch.x))
        c = covariate_onehot(batch.c, self.spec.covariate_sizes).to(h.dtype)
        return {
            "z_x": self.enc_x(torch.cat([h, c], dim=-1)),
            "z_t": self.enc_t(torch.cat([h, batch.d], dim=-1)),
            "z_tx": self.enc_tx(torch.cat([h, c, batch.d], dim=-1)),
        }

    def forward(self, batch: Batch, observe: bool = True):
        if batch.x is None:
            # posterior predictive without observations: the blocks come from the prior
            return
        post = self.posterior(batch)
        # kept for the model's regularisers on the same batch (FCRModel.auxiliary_loss):
        # the engine scores the ELBO then the regularisers of one batch, so the encoders run
        # once per step instead of twice (a weak reference to the batch: no stale reuse)
        self._last = None
        if torch.is_grad_enabled() and post["z_x"][0].requires_grad:
            state = {"graph": True}

            def _consumed(grad, state=state):  # a backward went through: graph freed
                state["graph"] = False

            post["z_x"][0].register_hook(_consumed)
            self._last = (weakref.ref(batch), post, state)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=batch.kl_weight * self.omega_kl):
                for name in BLOCKS:
                    loc, scale = post[name]
                    pyro.sample(name, dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Posterior means ``X_zx``, ``X_zt``, ``X_ztx`` and their concatenation ``X_latent``."""
        post = self.posterior(batch)
        out = {"X_zx": post["z_x"][0], "X_zt": post["z_t"][0], "X_ztx": post["z_tx"][0]}
        out["X_latent"] = torch.cat([out["X_zx"], out["X_zt"], out["X_ztx"]], dim=-1)
        return out
