"""The sVAE family: sparse mechanism shift (Lopez et al., CLeaR 2023; docs/models.md, "sVAE family").

Each cell i carries one label a_i (its perturbation; label 0 is the control, whose shift is
zero). Generative story, for A perturbation labels, L latents and the cell plate::

    pi_ak ~ Beta(1, K_s)                  global, "mask_prob"   (sVAE+; sVAE: flat + L0 penalty)
    m_ak  ~ Bernoulli(pi_ak)              global, "mask"
    z_i   ~ Normal(mu_{a_i} * m_{a_i}, I) local,  "z"           (mu: learned point parameter)
    x_i   ~ NB(l_i * softmax(f(z_i)), theta)                    observed, "x"

The decoder f never sees the label (that would leak it), and the encoder q(z | x) sees only
expression. The guide (:mod:`pyro_perturb.guides.svae`) takes ``pi`` as a point mass at
``sigmoid(alpha)`` (MAP: the Beta prior is the only term in alpha besides the likelihood
path) and draws the mask straight-through from ``Bernoulli(sigmoid(alpha))``
(:class:`~pyro_perturb.distributions.StraightThroughBernoulli`). Model and guide score the
hard mask with the same Bernoulli, so ``log p(m | pi) - log q(m)`` cancels exactly and
alpha learns from (a) the likelihood, through the straight-through mask in the prior of z,
and (b) the Beta(1, K_s) prior on pi, which enters **once per step** (a global site, not
scaled by N/B like the cell terms).

Members (each a registered model of the zoo, one shared implementation):

* ``svae_plus``: :class:`SVAEPlusModel`, the Beta(1, K_s) prior above.
* ``svae``: :class:`SVAEModel`, a flat prior on pi and an L0-like penalty
  ``l0_weight * sum_ak pi_ak`` (i.e. ``lambda * mean(pi)`` with ``lambda = l0_weight * A * L``),
  written as the prior ``pi_ak ~ Exponential(l0_weight)`` (the same log-density up to a
  constant).
* ``ivae``: :class:`IVAEModel`, ``z_i ~ N(mu_{a_i}, I)``, no mask (rotation-invariant).
* ``vae``: :class:`VAEModel`, ``z_i ~ N(0, I)``: no per-label parameter at all.
* ``beta_vae``: :class:`BetaVAEModel`, the VAE with its KL weighted by ``beta``.

KL warm-up (``batch.kl_weight``) scales every prior-side site, the mask prior included, so
that during warm-up the sparsity prior does not switch masks off while the likelihood's
pull on them is still down-weighted.

None of these can compose an unseen combination ``A+B`` of seen singles: a combination is
a label of its own (``composes = False``); a label code of -1 raises a ``ValueError``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import Independent, constraints, kl_divergence, register_kl

from ..contract import TargetScores, as_array
from ..data import Batch, DataSpec
from ..likelihoods import CountLikelihood
from ..nn import MLP

#: pi is clamped to [EPS, 1 - EPS] so that the Beta prior and the Bernoulli stay finite
MASK_EPS = 1e-6


def check_labels(batch: Batch, spec: DataSpec) -> None:
    """Refuse label codes outside the training vocabulary (e.g. an unseen combination)."""
    bad = batch.label < 0
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} cells carry a perturbation label absent from the model's "
            f"vocabulary (an unseen combination of known perturbations): the sVAE family "
            f"gives each label its own shift and cannot compose unseen combinations "
            f"(known labels: {', '.join(spec.labels[:10])}{', ...' if spec.labels[10:] else ''})"
        )


MASK_GRADIENTS = ("expected", "straight_through")


def check_mask_gradient(value: str) -> str:
    if value not in MASK_GRADIENTS:
        raise ValueError(f"mask_gradient must be one of {MASK_GRADIENTS}, got {value!r}")
    return value


def _squeeze_global(loc: torch.Tensor) -> torch.Tensor:
    """A global draw under a particle plate has shape (P, 1, ..., L): drop the 1 (cell
    plate slot) left after indexing the label rows, giving (P, B, L)."""
    while loc.dim() > 3 and loc.shape[-3] == 1:
        loc = loc.squeeze(-3)
    return loc


class ExpectedMaskNormal(TorchDistribution):
    """``Normal(loc, 1)`` over ``(L,)`` plus a log-density ``offset`` per batch entry.

    With the mask integrated out of the prior term exactly (``mask_gradient="expected"``):
    for ``m_k ~ Bernoulli(p_k)``,
    ``E_m[log N(z; m * mu, I)] = log N(z; p * mu, I) - 1/2 sum_k p_k (1 - p_k) mu_k^2``,
    so the z site scores ``log N(z; p * mu, I) + offset`` with
    ``offset = -1/2 sum_k p_k (1 - p_k) mu_k^2``. Sampling draws from ``N(loc, I)``.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, offset: torch.Tensor, validate_args=None) -> None:
        self.base = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
        batch_shape = torch.broadcast_shapes(self.base.batch_shape, offset.shape)
        self.base = self.base.expand(batch_shape)
        self.offset = offset.expand(batch_shape)
        super().__init__(batch_shape, self.base.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return ExpectedMaskNormal(self.base.base_dist.loc.expand(batch_shape + self.event_shape), self.offset.expand(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        return self.base.rsample(sample_shape)

    def log_prob(self, value):
        return self.base.log_prob(value) + self.offset


@register_kl(Independent, ExpectedMaskNormal)
def _kl_independent_expected_mask_normal(q, p):
    return kl_divergence(q, p.base) - p.offset


class SparseShiftModel(PyroModule):
    """Shared implementation of the family; subclasses pick ``mechanism``.

    ``mechanism``: ``"beta"`` (sVAE+), ``"l0"`` (sVAE), ``"shift"`` (iVAE), ``"none"``
    (VAE / beta-VAE).

    Args:
        spec: the data's :class:`DataSpec`; per-label parameters are indexed by
            ``batch.label`` over ``spec.labels`` (index 0 = control, zero shift).
        n_latent: L.
        n_hidden: width of the decoder's hidden layers.
        n_layers: number of hidden layers of the decoder.
        likelihood: ``"nb"``, ``"poisson"`` or ``"gaussian"``.
        shift_init_scale: sd of the random initial shifts mu (at mu = 0 the mask logits get
            no likelihood gradient and the prior switches every mask off).
    """

    max_plate_nesting = 1
    mechanism = "none"
    #: the shifts train at 10x the learning rate (see the guide's mask logits): Adam moves
    #: a parameter by about lr per step, and a shift of 5 at lr 3e-3 takes ~2,000 steps
    lr_multipliers = {"shift": 10.0}
    #: cannot predict an unseen combination of seen singles (label vocabulary only)
    composes = False
    beta = 1.0

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 15,
        n_hidden: int = 128,
        n_layers: int = 2,
        likelihood: str = "nb",
        shift_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.n_latent = n_latent
        self.n_shifted = spec.n_labels - 1  # every label but the control
        self.decoder = MLP(n_latent, [n_hidden] * n_layers, spec.n_genes)
        self.likelihood = CountLikelihood(spec.n_genes, likelihood)
        if self.has_shift:
            self.shift = nn.Parameter(shift_init_scale * torch.randn(self.n_shifted, n_latent))
        self._shift_init_scale = shift_init_scale

    # ---------------------------------------------------------------- structure
    @property
    def has_shift(self) -> bool:
        return self.mechanism in ("beta", "l0", "shift")

    @property
    def has_mask(self) -> bool:
        return self.mechanism in ("beta", "l0")

    # ---------------------------------------------------------------- prior of z
    @property
    def expected_mask(self) -> bool:
        """Integrate the mask out of the prior term exactly (training only, see
        :class:`ExpectedMaskNormal`); evaluation always samples the mask."""
        return self.has_mask and self.mask_gradient == "expected" and self.training

    def _mask_prior(self, like: torch.Tensor) -> torch.Tensor:
        """Sample ``mask_prob`` and (unless :attr:`expected_mask`) ``mask``; returns the
        mask, or the mask probabilities when the mask is integrated out."""
        shape = (self.n_shifted, self.n_latent)
        if self.mechanism == "beta":
            conc1 = like.new_ones(())
            conc0 = like.new_tensor(float(self.mask_prior_strength))
            prior = dist.Beta(conc1, conc0).expand(shape).to_event(2)
        else:
            # "l0": a flat prior on pi plus the L0-like penalty -l0_weight * sum(pi) is, up
            # to a constant, the log-density of Exponential(l0_weight) at pi (a proper
            # distribution, so no pyro.factor is needed)
            rate = like.new_tensor(float(self.l0_weight))
            prior = dist.Exponential(rate).expand(shape).to_event(2)
        pi = pyro.sample("mask_prob", prior)
        pi = pi.clamp(MASK_EPS, 1 - MASK_EPS)
        if self.expected_mask:
            return pi
        return pyro.sample("mask", dist.Bernoulli(probs=pi).to_event(2))

    @staticmethod
    def _rows(per_label: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(..., A, L) per perturbed label -> (..., B, L) per cell (control: 0)."""
        zero = torch.zeros_like(per_label[..., :1, :])
        full = torch.cat([zero, per_label], dim=-2)
        return _squeeze_global(full.index_select(-2, labels))

    def prior_loc(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean of p(z | a) for the batch's cells, (B, L) or (P, B, L), and the expected
        mask's log-density offset per cell (None when the mask is sampled). Call inside
        the ``poutine.scale`` of the latent sites (it samples the global mask sites)."""
        ref = batch.library
        if not self.has_shift:
            return ref.new_zeros((batch.size, self.n_latent)), None
        check_labels(batch, self.spec)
        shift = self.shift
        if not self.has_mask:
            return self._rows(shift, batch.label), None
        mask = self._mask_prior(ref)
        loc = self._rows(shift * mask, batch.label)
        if not self.expected_mask:
            return loc, None
        # mask = p here: E_m log N(z; m mu, I) = log N(z; p mu, I) - 1/2 sum p (1 - p) mu^2
        variance = self._rows(mask * (1 - mask) * shift.pow(2), batch.label)
        return loc, -0.5 * variance.sum(-1)

    # ---------------------------------------------------------------- model
    def forward(self, batch: Batch, observe: bool = True):
        """Score (or, with ``observe=False``, sample) the batch's counts."""
        # beta (beta-VAE) weights the KL in training only: evaluation scores the true ELBO
        scale = batch.kl_weight * (self.beta if self.training else 1.0)
        with poutine.scale(scale=scale):
            loc, offset = self.prior_loc(batch)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=scale):
                prior = dist.Normal(loc, 1.0).to_event(1) if offset is None else ExpectedMaskNormal(loc, offset)
                z = pyro.sample("z", prior)
            gene_logits = self.decoder(z)
            x = batch.x if observe else None
            return self.likelihood.observe("x", gene_logits, x, batch.library)

    # ---------------------------------------------------------------- helpers
    def label_rows(self, label_codes: torch.Tensor) -> torch.Tensor:
        """Rows of the per-label parameters of the given label codes (control refused)."""
        label_codes = torch.as_tensor(label_codes, dtype=torch.long)
        if bool((label_codes <= 0).any()):
            raise ValueError("the control (label 0) and unknown labels (-1) have no shift parameters")
        return label_codes - 1

    def transfer_parameters(self, label_codes: torch.Tensor, reset: bool = True):
        """``[(parameter, rows)]`` a transfer fits for the given labels (see
        :mod:`pyro_perturb.infer.transfer`); with ``reset`` those rows are re-initialised."""
        if not self.has_shift:
            return []
        rows = self.label_rows(label_codes).to(self.shift.device)
        if reset:
            with torch.no_grad():
                self.shift[rows] = self._shift_init_scale * torch.randn(
                    len(rows), self.n_latent, device=self.shift.device, dtype=self.shift.dtype
                )
        return [(self.shift, rows)]

    @torch.no_grad()
    def target_scores(self) -> TargetScores | None:
        """``|mu|`` with rows ``spec.labels`` (row 0 = control), ranked top-k, or ``None``
        without per-label shifts. Mask members' guides give mask probabilities instead."""
        mu = self.shift_matrix()
        return None if mu is None else TargetScores(as_array(mu.abs()), False, list(self.spec.labels))

    @torch.no_grad()
    def shift_matrix(self) -> torch.Tensor | None:
        """The learned shifts mu, (n_labels, L), control row 0 (None without shifts)."""
        if not self.has_shift:
            return None
        return torch.cat([torch.zeros_like(self.shift[:1]), self.shift], dim=0)


class SVAEPlusModel(SparseShiftModel):
    """sVAE+: ``sigmoid(alpha_ak) ~ Beta(1, K_s)`` on the mask probabilities.

    Args (besides :class:`SparseShiftModel`'s):
        mask_prior_strength: K_s of the Beta(1, K_s) prior (> 1 pushes masks off; 1: no
            sparsity). Default 20: 5 over-calls targets, 100 switches almost every mask
            off (chosen by experiment: bench/results/defaults_rationale.md#svae-family).
        mask_gradient: ``"straight_through"`` (default) or ``"expected"`` (the mask
            integrated out of the prior of z exactly in training); see
            :class:`~pyro_perturb.guides.svae.MaskedShiftGuide`.
    """

    mechanism = "beta"

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 15,
        n_hidden: int = 128,
        n_layers: int = 2,
        likelihood: str = "nb",
        shift_init_scale: float = 1.0,
        mask_prior_strength: float = 20.0,
        mask_gradient: str = "straight_through",
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers, likelihood, shift_init_scale)
        self.mask_gradient = check_mask_gradient(mask_gradient)
        if not mask_prior_strength > 0:
            raise ValueError(f"mask_prior_strength (K_s) must be > 0, got {mask_prior_strength}")
        self.mask_prior_strength = float(mask_prior_strength)


class SVAEModel(SparseShiftModel):
    """sVAE: flat prior on the mask probabilities plus ``l0_weight * sum(pi)``."""

    mechanism = "l0"

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 15,
        n_hidden: int = 128,
        n_layers: int = 2,
        likelihood: str = "nb",
        shift_init_scale: float = 1.0,
        l0_weight: float = 20.0,
        mask_gradient: str = "straight_through",
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers, likelihood, shift_init_scale)
        self.mask_gradient = check_mask_gradient(mask_gradient)
        if not l0_weight > 0:
            raise ValueError(f"l0_weight must be > 0, got {l0_weight}")
        self.l0_weight = float(l0_weight)


class IVAEModel(SparseShiftModel):
    """iVAE: ``z_i ~ N(mu_{a_i}, I)``, a dense learned shift per label, no mask."""

    mechanism = "shift"


class VAEModel(SparseShiftModel):
    """VAE: ``z_i ~ N(0, I)``; no per-label parameter (the label is never used)."""

    mechanism = "none"

    def __init__(
        self, spec: DataSpec, n_latent: int = 15, n_hidden: int = 128, n_layers: int = 2, likelihood: str = "nb"
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers, likelihood)


class BetaVAEModel(SparseShiftModel):
    """beta-VAE: the VAE with the KL term weighted by ``beta``."""

    mechanism = "none"

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 15,
        n_hidden: int = 128,
        n_layers: int = 2,
        likelihood: str = "nb",
        beta: float = 4.0,
    ) -> None:
        super().__init__(spec, n_latent, n_hidden, n_layers, likelihood)
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)
