"""Conditional VAE: the SAMS-VAE paper's simplest baseline (docs/models.md, "Conditional VAE").

Generative story, for cell i with counts ``x_i`` (G genes), dosage ``d_i`` (T
perturbations), covariates ``c_i`` and observed library size ``l_i``::

    z_i ~ Normal(0, I_L)                                   (local latent, "z")
    x_i ~ NB(l_i * softmax(f([z_i, d_i, onehot(c_i)])), theta)   (observed, "x")

The decoder ``f`` sees the dosage directly, so a combination ``A+B`` is decoded from its
multi-hot dosage; nothing forces effects to be sparse or additive in latent space.
The matching guide is :class:`pyro_perturb.guides.cvae.ConditionalVAEGuide`.

Reference: Bereket & Karaletsos, "Modelling Cellular Perturbations with the Sparse
Additive Mechanism Shift Variational Autoencoder", NeurIPS 2023 (baselines section).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..likelihoods import CountLikelihood
from ..nn import MLP, broadcast_cat, covariate_onehot


class ConditionalVAEModel(PyroModule):
    """p(z) p(x | z, d, c).

    Args:
        spec: the data's :class:`DataSpec` (gene, perturbation, covariate sizes).
        n_latent: L.
        n_hidden: width of the decoder's hidden layers.
        n_layers: number of hidden layers.
        likelihood: ``"nb"``, ``"poisson"`` or ``"gaussian"``.
    """

    max_plate_nesting = 1
    #: z's prior ignores the dosage (the decoder sees it): a control cell's posterior z,
    #: decoded under another dosage, is its counterfactual
    basal_sites = ("z",)

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 100,
        n_hidden: int = 400,
        n_layers: int = 1,
        likelihood: str = "nb",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.n_latent = n_latent
        n_cov = sum(spec.covariate_sizes)
        self.decoder = MLP(n_latent + spec.n_perturbations + n_cov, [n_hidden] * n_layers, spec.n_genes)
        self.likelihood = CountLikelihood(spec.n_genes, likelihood)

    def forward(self, batch: Batch, observe: bool = True):
        """Score (or, with ``observe=False``, sample) the batch's counts."""
        x = batch.x
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            # from an input that is never None (x is None for posterior predictive)
            loc = batch.library.new_zeros((batch.size, self.n_latent))
            with poutine.scale(scale=batch.kl_weight):
                z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            decoder_input = broadcast_cat([z, batch.d, covariate_onehot(batch.c, self.spec.covariate_sizes)])
            gene_logits = self.decoder(decoder_input)
            return self.likelihood.observe("x", gene_logits, x if observe else None, batch.library)
