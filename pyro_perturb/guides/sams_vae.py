"""Guides of SAMS-VAE and CPA-VAE (:mod:`pyro_perturb.models.sams_vae`).

The SAMS-VAE paper's two guide families (docs/models.md, "SAMS-VAE guides"):

* Mean-field (:class:`SAMSVAEMeanFieldGuide`, registered as ``sams_vae_mf``)::

      q(M_tl) = Bernoulli(sigmoid(phi_tl))      straight-through, hard-value log q
      q(E_tl) = Normal(a_tl, b_tl)              free parameters
      q(z_basal_i | x_i) = Normal(enc(x_i))

* Correlated (:class:`SAMSVAECorrelatedGuide`, registered as ``sams_vae``, the paper's
  headline)::

      q(M_tl) = Bernoulli(sigmoid(phi_tl))      as above
      q(E_t | M_t) = Normal(MLP([M_t, onehot(t)]))
      q(z_basal_i | x_i, d_i @ (E * M)) = Normal(enc([x_i, offset_i]))

  the basal encoder sees the offset sampled for the cell, so it can subtract it.

* CPA-VAE (:class:`CPAVAEGuide`): the mean-field guide without a mask.

Masks are drawn with :class:`~pyro_perturb.distributions.StraightThroughBernoulli`
(relaxed Bernoulli at ``temperature``, hard value forward, relaxed gradient) whose log q
is the Bernoulli log-mass of the hard value. The mask logits carry a learning-rate
multiplier (``lr_multipliers``): Adam moves a logit by about ``lr`` per step, far too
slowly for masks to become sparse at the paper's lr (bench/results/defaults_rationale.md#sams-vae).

With ``batch.x is None`` (posterior predictive) the guides sample only the global sites;
``z_basal`` then comes from the model's prior.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from ..contract import TargetScores, as_array
from ..data import Batch, DataSpec
from ..distributions import StraightThroughBernoulli, dosage_offset
from ..nn import MLP, ExpressionNormalizer, GaussianEncoder


def _inverse_softplus(y: float) -> float:
    return float(torch.log(torch.expm1(torch.tensor(y))))


class _ShiftGuideBase(PyroModule):
    """Parts shared by the three guides: expression normaliser, basal encoder, q(E) init."""

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int,
        n_hidden: int,
        n_layers: int,
        encoder_extra: int = 0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.n_latent = n_latent
        self.n_treatments = spec.n_perturbations
        self.normalizer = ExpressionNormalizer(spec.n_genes)
        self.encoder = GaussianEncoder(spec.n_genes + encoder_extra, [n_hidden] * n_layers, n_latent)

    def _basal(self, batch: Batch, offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.normalizer(batch.x)
        if offset is not None:
            # = encoder(cat([x, offset])), with x's block multiplied once per cell, not
            # once per particle (the offset carries the particle dims)
            return self.encoder.forward_parts([inputs, offset])
        return self.encoder(inputs)

    def _sample_basal(self, batch: Batch, offset: torch.Tensor | None = None) -> None:
        loc, scale = self._basal(batch, offset)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=batch.kl_weight):
                pyro.sample("z_basal", dist.Normal(loc, scale).to_event(1))


class _MaskMixin:
    """q(M) = Bernoulli(sigmoid(mask_logits)), straight-through."""

    def _init_mask(self, mask_init_logit: float, temperature: float) -> None:
        self.mask_logits = nn.Parameter(torch.full((self.n_treatments, self.n_latent), float(mask_init_logit)))
        # a buffer, not a tensor made in forward: follows .to(device) (and JIT tracing)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def _sample_mask(self) -> torch.Tensor:
        return pyro.sample(
            "M", StraightThroughBernoulli(self.temperature, logits=self.mask_logits).to_event(2)
        )

    @torch.no_grad()
    def mask_probabilities(self) -> torch.Tensor:
        """``q(M_tl = 1)``, shape ``(T, L)``, rows :meth:`mask_labels`."""
        return torch.sigmoid(self.mask_logits)

    def mask_labels(self) -> list[str]:
        """Row names of :meth:`mask_probabilities`: the single perturbations."""
        return list(self.spec.perturbations)

    def target_scores(self) -> TargetScores:
        """For :mod:`pyro_perturb.evaluate.recovery`: ``q(M = 1)`` per perturbation
        (rows ``spec.perturbations``), called targets where > 0.5."""
        return TargetScores(as_array(self.mask_probabilities()), True, self.mask_labels())


class SAMSVAEMeanFieldGuide(_MaskMixin, _ShiftGuideBase):
    """Mean-field SAMS-VAE guide: ``q(M) q(E) prod_i q(z_basal_i | x_i)``.

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent: L.
        n_hidden: encoder width.
        n_layers: encoder hidden layers.
        temperature: Gumbel (relaxed Bernoulli) temperature of the mask (paper: 1).
        mask_init_logit: initial mask logits (0: q(M) = 0.5, every latent reachable).
    """

    lr_multipliers = {"mask_logits": 10.0}

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 100,
        n_hidden: int = 400,
        n_layers: int = 1,
        temperature: float = 1.0,
        mask_init_logit: float = 0.0,
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers)
        self._init_mask(mask_init_logit, temperature)
        shape = (self.n_treatments, n_latent)
        self.E_loc = nn.Parameter(0.1 * torch.randn(shape))
        self.E_raw_scale = nn.Parameter(torch.full(shape, _inverse_softplus(0.1)))

    def forward(self, batch: Batch, observe: bool = True):
        self._sample_mask()
        pyro.sample("E", dist.Normal(self.E_loc, F.softplus(self.E_raw_scale) + 1e-4).to_event(2))
        if batch.x is None:
            return
        self._sample_basal(batch)

    @torch.no_grad()
    def effect_mean(self) -> torch.Tensor:
        """Posterior-mean-like effect ``E_loc * 1[q(M) > 0.5]``, shape ``(T, L)``."""
        return self.E_loc * (self.mask_probabilities() > 0.5).to(self.E_loc.dtype)

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``X_basal``: mean of q(z_basal | x); ``X_latent``: that plus the cell's offset."""
        basal = self._basal(batch, None)[0]
        return {"X_latent": basal + dosage_offset(batch.d, self.effect_mean()), "X_basal": basal}


class SAMSVAECorrelatedGuide(_MaskMixin, _ShiftGuideBase):
    """Correlated SAMS-VAE guide: ``q(M) q(E | M) prod_i q(z_basal_i | x_i, d_i @ (E * M))``.

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent: L.
        n_hidden: width of the basal encoder and of the ``q(E_t | M_t, t)`` network.
        n_layers: hidden layers of both.
        temperature: Gumbel (relaxed Bernoulli) temperature of the mask (paper: 1).
        mask_init_logit: initial mask logits (0: q(M) = 0.5).
    """

    lr_multipliers = {"mask_logits": 10.0}

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 100,
        n_hidden: int = 400,
        n_layers: int = 1,
        temperature: float = 1.0,
        mask_init_logit: float = 0.0,
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers, encoder_extra=n_latent)
        self._init_mask(mask_init_logit, temperature)
        self.effect_encoder = GaussianEncoder(n_latent + self.n_treatments, [n_hidden] * n_layers, n_latent)

    def treatment_network(self) -> nn.Module:
        """The network run once per treatment and particle, ``q(E_t | M_t, t)`` (the ATE's
        memory model counts its activations)."""
        return self.effect_encoder

    def _effect_params(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(self.n_treatments, dtype=M.dtype, device=M.device)
        # = effect_encoder(cat([M, eye])) without expanding eye to M's particle dims
        return self.effect_encoder.forward_parts([M, eye])

    def forward(self, batch: Batch, observe: bool = True):
        M = self._sample_mask()
        loc, scale = self._effect_params(M)
        E = pyro.sample("E", dist.Normal(loc, scale).to_event(2))
        if batch.x is None:
            return
        self._sample_basal(batch, dosage_offset(batch.d, E * M))

    @torch.no_grad()
    def effect_mean(self) -> torch.Tensor:
        """``E[E | M_hat] * M_hat`` with ``M_hat = 1[q(M) > 0.5]``, shape ``(T, L)``."""
        M = (self.mask_probabilities() > 0.5).to(self.mask_logits.dtype)
        return self._effect_params(M)[0] * M

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``X_basal``: mean of q(z_basal | x, offset) at the mean offset; ``X_latent``: plus the offset."""
        offset = dosage_offset(batch.d, self.effect_mean())
        basal = self._basal(batch, offset)[0]
        return {"X_latent": basal + offset, "X_basal": basal}


class CPAVAEGuide(_ShiftGuideBase):
    """CPA-VAE guide: ``q(E) prod_i q(z_basal_i | x_i)`` (mean-field, no mask).

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent: L.
        n_hidden: encoder width.
        n_layers: encoder hidden layers.
    """

    def __init__(self, spec: DataSpec, n_latent: int = 100, n_hidden: int = 400, n_layers: int = 1) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers)
        shape = (self.n_treatments, n_latent)
        self.E_loc = nn.Parameter(0.1 * torch.randn(shape))
        self.E_raw_scale = nn.Parameter(torch.full(shape, _inverse_softplus(0.1)))

    def forward(self, batch: Batch, observe: bool = True):
        pyro.sample("E", dist.Normal(self.E_loc, F.softplus(self.E_raw_scale) + 1e-4).to_event(2))
        if batch.x is None:
            return
        self._sample_basal(batch)

    @torch.no_grad()
    def effect_mean(self) -> torch.Tensor:
        return self.E_loc.detach().clone()

    def target_scores(self) -> TargetScores:
        """For :mod:`pyro_perturb.evaluate.recovery`: ``|E|`` per perturbation (rows
        ``spec.perturbations``), ranked top-k (CPA-VAE has no mask)."""
        return TargetScores(as_array(self.E_loc.detach().abs()), False, list(self.spec.perturbations))

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        basal = self._basal(batch, None)[0]
        return {"X_latent": basal + dosage_offset(batch.d, self.effect_mean()), "X_basal": basal}
