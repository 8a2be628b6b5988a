"""Guides of the sVAE family (:mod:`pyro_perturb.models.svae`).

* ``q(z_i | x_i) = Normal(enc(standardise(log1p x_i)))``: expression only, never the label.
* Mask members (sVAE+, sVAE): ``q(pi) = Delta(sigmoid(alpha))`` (MAP point mass) and
  ``q(m) = Bernoulli(sigmoid(alpha))`` drawn straight-through
  (:class:`~pyro_perturb.distributions.StraightThroughBernoulli`, hard value forward,
  relaxed gradient backward, Bernoulli log-mass of the hard value). Both are global sites;
  ``alpha`` (``mask_logits``, one row per perturbation label, control excluded) is the
  only variational parameter besides the encoder.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from ..contract import TargetScores, as_array
from ..data import Batch, DataSpec
from ..distributions import StraightThroughBernoulli
from ..models.svae import MASK_EPS, check_mask_gradient
from ..nn import ExpressionNormalizer, GaussianEncoder


class SparseShiftGuide(PyroModule):
    """q(z | x) (and, with ``has_mask``, q(pi), q(m)); same signature as the model.

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent: L.
        n_hidden: width of the encoder's hidden layers.
        n_layers: number of hidden layers of the encoder.
    """

    has_mask = False
    beta = 1.0

    def __init__(self, spec: DataSpec, n_latent: int = 15, n_hidden: int = 128, n_layers: int = 2) -> None:
        super().__init__()
        self.spec = spec
        self.n_latent = n_latent
        self.n_shifted = spec.n_labels - 1
        self.normalizer = ExpressionNormalizer(spec.n_genes)
        self.encoder = GaussianEncoder(spec.n_genes, [n_hidden] * n_layers, n_latent)

    def _posterior(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(self.normalizer(batch.x))

    def _globals(self, batch: Batch) -> None:
        """Global sites (the mask members override this)."""

    def forward(self, batch: Batch, observe: bool = True):
        scale = batch.kl_weight * (self.beta if self.training else 1.0)
        with poutine.scale(scale=scale):
            self._globals(batch)
        if batch.x is None:
            # posterior predictive without observations: z then comes from the prior
            return
        loc, sd = self._posterior(batch)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=scale):
                pyro.sample("z", dist.Normal(loc, sd).to_event(1))

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Posterior means: ``{"X_latent": (B, L)}``."""
        return {"X_latent": self._posterior(batch)[0]}

    def transfer_parameters(self, label_codes: torch.Tensor, reset: bool = True):
        return []


class MaskedShiftGuide(SparseShiftGuide):
    """Guide of sVAE+ and sVAE: the encoder plus the mask logits alpha.

    Args (besides :class:`SparseShiftGuide`'s):
        mask_init_logit: initial alpha of every mask (0: probability 1/2).
        mask_temperature: temperature of the straight-through relaxation.
        mask_gradient: how training differentiates the ELBO's expectation over the masks.
            ``"straight_through"`` (default, the paper's estimator): the mask is drawn
            straight-through. ``"expected"``: exactly, the mask being integrated out of
            the only term it enters, the prior of z (Rao-Blackwellisation; see
            :class:`~pyro_perturb.models.svae.ExpectedMaskNormal`); the mask site is then
            not sampled in training. Evaluation (validation ELBO, IWELBO,
            posterior predictive) always samples the mask from q(m). Both estimate the
            same ELBO; the straight-through gradient is biased: at m = 1 with z near mu
            the derivative of log N(z; m mu, I) in m is ~0, so an "on" mask feels only the
            prior and drifts back towards 1/2 (measured: masks hover at 0.4-0.6).
    """

    has_mask = True
    #: mask logits train at 10x the learning rate: Adam moves each logit by about lr per
    #: step, so at lr 3e-3 masks stay undecided for thousands of steps (chosen by
    #: experiment: bench/results/defaults_rationale.md#svae-family)
    lr_multipliers = {"mask_logits": 10.0}

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 15,
        n_hidden: int = 128,
        n_layers: int = 2,
        mask_init_logit: float = 0.0,
        mask_temperature: float = 1.0,
        mask_gradient: str = "straight_through",
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers)
        self.mask_gradient = check_mask_gradient(mask_gradient)
        self._mask_init_logit = float(mask_init_logit)
        self.mask_logits = nn.Parameter(torch.full((self.n_shifted, n_latent), float(mask_init_logit)))
        self.register_buffer("mask_temperature", torch.tensor(float(mask_temperature)))

    def _mask_probs(self) -> torch.Tensor:
        """sigmoid(alpha) clamped as in the model, (A, L), differentiable."""
        return torch.sigmoid(self.mask_logits).clamp(MASK_EPS, 1 - MASK_EPS)

    @torch.no_grad()
    def mask_probabilities(self) -> torch.Tensor:
        """q(m = 1) = sigmoid(alpha) clamped as in the model, (A, L), rows :meth:`mask_labels`."""
        return self._mask_probs()

    def mask_labels(self) -> list[str]:
        """Row names of :meth:`mask_probabilities`: every label but the control."""
        return list(self.spec.labels[1:])

    def _globals(self, batch: Batch) -> None:
        pi = self._mask_probs()
        pyro.sample("mask_prob", dist.Delta(pi).to_event(2))
        if self.mask_gradient == "expected" and self.training:
            return  # the model integrates the mask out of its prior term exactly
        pyro.sample("mask", StraightThroughBernoulli(self.mask_temperature, probs=pi).to_event(2))

    def transfer_parameters(self, label_codes: torch.Tensor, reset: bool = True):
        label_codes = torch.as_tensor(label_codes, dtype=torch.long)
        if bool((label_codes <= 0).any()):
            raise ValueError("the control (label 0) and unknown labels (-1) have no mask parameters")
        rows = (label_codes - 1).to(self.mask_logits.device)
        if reset:
            with torch.no_grad():
                self.mask_logits[rows] = self._mask_init_logit
        return [(self.mask_logits, rows)]

    @torch.no_grad()
    def target_scores(self) -> TargetScores:
        """Mask probabilities ``(n_labels, L)`` with rows ``spec.labels`` (row 0, the
        control, is 0), called targets where > 0.5."""
        pi = self.mask_probabilities()
        return TargetScores(as_array(torch.cat([torch.zeros_like(pi[:1]), pi], dim=0)), True, list(self.spec.labels))


class BetaVAEGuide(SparseShiftGuide):
    """Guide of the beta-VAE: its z site carries the same KL weight ``beta``."""

    def __init__(
        self, spec: DataSpec, n_latent: int = 15, n_hidden: int = 128, n_layers: int = 2, beta: float = 4.0
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers)
        self.beta = float(beta)
