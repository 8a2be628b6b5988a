"""SAMS-VAE and its mask-free baseline CPA-VAE (docs/models.md, "SAMS-VAE" and "CPA-VAE").

SAMS-VAE (sparse additive mechanism shift VAE), for cell i with counts ``x_i`` (G genes),
dosage ``d_i`` (T perturbations; multi-hot for a combination) and library size ``l_i``::

    E_tl ~ Normal(0, s^2)                 global: latent effect of treatment t   ("E")
    M_tl ~ Bernoulli(p)                   global: sparse mask, p = mask_prior    ("M")
    z_basal_i ~ Normal(0, I_L)            local: the cell's unperturbed state    ("z_basal")
    z_i = z_basal_i + d_i @ (E * M)       sparse, additive, composable
    x_i ~ NB(l_i * softmax(f(z_i)), theta)                                         ("x")

A combination ``A+B`` has the dosage ``d_A = d_B = 1`` and therefore the latent effect
``E_A * M_A + E_B * M_B``: the model predicts combinations it never saw, from their
singles (``composes = True``; the ATE code asks this attribute).

CPA-VAE (the paper's baseline) is the same story without the mask:
``z_i = z_basal_i + d_i @ E``.

The guides are in :mod:`pyro_perturb.guides.sams_vae`: the mean-field and the correlated
family for SAMS-VAE, the mean-field one for CPA-VAE.

Reference: Bereket & Karaletsos, "Modelling Cellular Perturbations with the Sparse
Additive Mechanism Shift Variational Autoencoder", NeurIPS 2023.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..distributions import dosage_offset
from ..likelihoods import CountLikelihood
from ..nn import MLP, broadcast_cat, covariate_onehot

#: Training defaults of ``sams_vae``, ``sams_vae_mf`` and ``cpa_vae`` (registry
#: ``train_defaults``; every key can be overridden with ``fit --set``): the paper's batch
#: and particles; lr 3e-3 (not the paper's 3e-4) with the mask logits at x10, and early
#: stopping. Chosen by experiment: bench/results/defaults_rationale.md#sams-vae
SAMS_TRAIN_DEFAULTS = {
    "max_epochs": 100,
    "batch_size": 512,
    "lr": 3e-3,
    "num_particles": 5,
    "early_stopping_patience": 15,
}


class AdditiveShiftModel(PyroModule):
    """Shared body of SAMS-VAE and CPA-VAE: ``z = z_basal + d @ effect``, NB decoder.

    Subclasses define :meth:`sample_effect`, which samples the global sites and returns
    the ``(T, L)`` effect matrix (with particle dims when vectorised).
    """

    max_plate_nesting = 1
    #: the model predicts any combination of known singles (the ATE code asks this)
    composes = True
    #: z_basal's prior ignores the dosage: a control cell's posterior draw is its basal state
    basal_sites = ("z_basal",)

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 100,
        n_hidden: int = 400,
        n_layers: int = 1,
        embedding_prior_scale: float = 1.0,
        likelihood: str = "nb",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.n_latent = n_latent
        self.n_treatments = spec.n_perturbations
        self.embedding_prior_scale = float(embedding_prior_scale)
        n_cov = sum(spec.covariate_sizes)
        # covariates (if any) go to the decoder next to z; the paper's data has none
        self.decoder = MLP(n_latent + n_cov, [n_hidden] * n_layers, spec.n_genes)
        self.likelihood = CountLikelihood(spec.n_genes, likelihood)

    def sample_effect(self, like: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def decode(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Gene logits ``f(z)`` (``z`` may have particle dims)."""
        if self.spec.covariate_sizes:
            z = broadcast_cat([z, covariate_onehot(batch.c, self.spec.covariate_sizes)])
        return self.decoder(z)

    def forward(self, batch: Batch, observe: bool = True):
        """Score (or, with ``observe=False`` / ``batch.x=None``, sample) the counts."""
        like = batch.library  # every new tensor is created from an input's device
        effect = self.sample_effect(like)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            loc = like.new_zeros((batch.size, self.n_latent))
            with poutine.scale(scale=batch.kl_weight):
                z_basal = pyro.sample("z_basal", dist.Normal(loc, 1.0).to_event(1))
            z = z_basal + dosage_offset(batch.d, effect)
            gene_logits = self.decode(z, batch)
            x = batch.x if observe else None
            return self.likelihood.observe("x", gene_logits, x, batch.library)


class SAMSVAEModel(AdditiveShiftModel):
    """SAMS-VAE: ``p(E) p(M) p(z_basal) p(x | z_basal + d @ (E * M))``.

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent: L (paper: 100 or 200).
        n_hidden: decoder width (paper: 400).
        n_layers: decoder hidden layers (paper: 1).
        mask_prior: ``p`` of ``M_tl ~ Bernoulli(p)`` (paper: 0.01; swept 0.1-0.001).
        embedding_prior_scale: ``s`` of ``E_tl ~ Normal(0, s^2)``.
        likelihood: ``"nb"``, ``"poisson"`` or ``"gaussian"``.
    """

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 100,
        n_hidden: int = 400,
        n_layers: int = 1,
        mask_prior: float = 0.01,
        embedding_prior_scale: float = 1.0,
        likelihood: str = "nb",
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers, embedding_prior_scale, likelihood)
        if not 0.0 < float(mask_prior) < 1.0:
            raise ValueError(f"mask_prior must lie in (0, 1), got {mask_prior}")
        self.mask_prior = float(mask_prior)

    def sample_effect(self, like: torch.Tensor) -> torch.Tensor:
        shape = (self.n_treatments, self.n_latent)
        E = pyro.sample(
            "E", dist.Normal(like.new_zeros(shape), self.embedding_prior_scale).to_event(2)
        )
        M = pyro.sample(
            "M", dist.Bernoulli(probs=like.new_full(shape, self.mask_prior)).to_event(2)
        )
        return E * M


class CPAVAEModel(AdditiveShiftModel):
    """CPA-VAE: ``p(E) p(z_basal) p(x | z_basal + d @ E)``: SAMS-VAE without the mask.

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent, n_hidden, n_layers, embedding_prior_scale, likelihood: as in
            :class:`SAMSVAEModel`.
    """

    def sample_effect(self, like: torch.Tensor) -> torch.Tensor:
        shape = (self.n_treatments, self.n_latent)
        return pyro.sample(
            "E", dist.Normal(like.new_zeros(shape), self.embedding_prior_scale).to_event(2)
        )
