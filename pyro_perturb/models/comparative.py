"""Comparative (contrastive) VAEs: background and salient latent blocks (docs/models.md,
"Comparative models").

Two data sets are compared: *background* cells (the controls, label code 0) and *target*
cells (every perturbed cell). For cell i with counts ``x_i``, covariates ``c_i`` and
observed library size ``l_i``, ``t_i = 1`` for a target cell and 0 for a control::

    z_b,i ~ Normal(0, I_Lb)                       background latents, every cell   ("z_background")
    z_s,i ~ Normal(0, I_Ls)   if t_i = 1          salient latents, target cells    ("z_salient")
    z_s,i = 0                 if t_i = 0          (a point mass: controls have none)
    x_i   ~ NB(l_i * softmax(f([z_b,i, z_s,i, onehot(c_i)])), theta)   (or Poisson)

``f`` is a ReLU MLP, a piecewise-affine map: with count noise this is the setting in which
the two blocks are identifiable block-wise (Lopez et al. 2024). The salient site is a
``MaskedMixture`` of a point mass at 0 (controls) and the Normal (targets), so its value is
exactly zero for controls in every trace. The label itself only says control or target:
nothing tells the model which perturbation a cell received, so perturbation identity can
only be found in the salient space (or leak into the background one).

Three ways to fit the same model, one registered entry each:

* ``contrastive_vae`` (:class:`ContrastiveVAEModel`): the sum of the background cells'
  ELBO and the target cells' ELBO, i.e. the plain ELBO of all cells (contrastiveVI without
  its optional penalty; Weinberger, Lin & Lee, Nat. Methods 2023).
* ``mo_cvae`` (:class:`MOCVAEModel`): the two ELBOs as two objectives of a multi-objective
  problem. Each step takes the gradient of each (``g_b``, ``g_t``) and descends along their
  min-norm convex combination ``a g_b + (1 - a) g_t`` (MGDA, Desideri 2012; Sener & Koltun
  2018), closed form for two objectives (:func:`min_norm_weight`). The loss the step
  differentiates is ``2 (a L_b + (1 - a) L_t)`` (the ELBO's scale at ``a = 1/2``), through
  the contract's ``training_loss``. A common descent direction for both data sets: neither
  the (usually larger) target set nor the background set dominates the shared decoder and
  background encoder.
* ``co_cvae`` (:class:`COCVAEModel`): the plain ELBO under the constraint
  ``nHSIC(z_b, z_s) <= epsilon`` on the target cells of each minibatch (normalised unbiased
  HSIC of the posterior means, :func:`pyro_perturb.hsic.normalized_hsic`: about 0 for
  independent blocks, at most 1): the level ``epsilon`` (``independence_level``) is
  interpretable, unlike a penalty weight. Solved by
  a Lagrangian: the step minimises ``-ELBO + lambda * n_cells * (nHSIC - epsilon)`` and the
  multiplier takes a projected gradient-ascent step ``lambda <- max(0, lambda + eta *
  (nHSIC - epsilon))`` (``multiplier_lr``) after each training step's loss, so it grows
  while the constraint is violated and decays back to 0 once it holds.

The guide is :class:`pyro_perturb.guides.comparative.ComparativeGuide` (two encoders).

References: Lopez, Huetter, Hajiramezanali, Pritchard, Regev, "Toward the Identifiability
of Comparative Deep Generative Models", CLeaR 2024 (arXiv 2401.15903); Weinberger, Lin,
Lee, "Isolating salient variations of interest in single-cell data with contrastiveVI",
Nature Methods 2023; Abid & Zou, "Contrastive variational autoencoder", 2019.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..hsic import normalized_hsic
from ..likelihoods import CountLikelihood
from ..nn import MLP, broadcast_cat, covariate_onehot

#: site names of the two latent blocks
BACKGROUND_SITE = "z_background"
SALIENT_SITE = "z_salient"

#: training defaults of the three entries (small latent blocks; step budget added by the registry)
COMPARATIVE_TRAIN_DEFAULTS = {"max_epochs": 200, "batch_size": 256, "lr": 1e-3, "kl_warmup_epochs": 0}


def is_target(batch: Batch) -> torch.Tensor:
    """``(B,)`` bool: the batch's target (perturbed) cells; label code 0 is a control, any
    other code (an unseen combination's -1 included) a target."""
    return batch.label != 0


def salient_distribution(target: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
    """``Normal(loc, scale)`` on target rows, a point mass at 0 on control rows.

    Args:
        target: ``(B,)`` bool.
        loc, scale: ``(..., B, Ls)``.
    """
    normal = dist.Normal(loc, scale).to_event(1)
    point = dist.Delta(torch.zeros_like(loc), event_dim=1)
    return dist.MaskedMixture(target, point, normal)


def min_norm_weight(g_background: torch.Tensor, g_target: torch.Tensor) -> torch.Tensor:
    """MGDA's weight ``a`` in [0, 1] of the min-norm point ``a g_b + (1 - a) g_t`` of the
    segment between two flat gradients: ``clamp(((g_t - g_b) . g_t) / ||g_b - g_t||^2, 0, 1)``
    (``1/2`` when the gradients are equal). A scalar tensor, no grad."""
    diff = g_background - g_target
    denom = diff.dot(diff)
    if float(denom) <= 0:
        return g_target.new_tensor(0.5)
    return ((g_target - g_background).dot(g_target) / denom).clamp(0.0, 1.0).detach()


class ContrastiveVAEModel(PyroModule):
    """p(z_b) p(z_s | t) p(x | z_b, z_s, c): the comparative VAE, fitted by the plain ELBO.

    Args:
        spec: the data's :class:`DataSpec`.
        n_background: Lb, background latents (every cell).
        n_salient: Ls, salient latents (target cells only).
        n_hidden: width of the decoder's hidden layers.
        n_layers: number of hidden layers (ReLU).
        likelihood: ``"nb"`` or ``"poisson"`` (``"gaussian"`` also runs).
    """

    max_plate_nesting = 1
    #: z_b's prior is the same for controls and targets: the cell's unperturbed state
    basal_sites = (BACKGROUND_SITE,)

    def __init__(
        self,
        spec: DataSpec,
        n_background: int = 10,
        n_salient: int = 5,
        n_hidden: int = 128,
        n_layers: int = 1,
        likelihood: str = "nb",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.n_background = n_background
        self.n_salient = n_salient
        self.n_latent = n_background + n_salient
        n_cov = sum(spec.covariate_sizes)
        self.decoder = MLP(self.n_latent + n_cov, [n_hidden] * n_layers, spec.n_genes)
        self.likelihood = CountLikelihood(spec.n_genes, likelihood)

    def forward(self, batch: Batch, observe: bool = True):
        """Score (or, with ``observe=False``, sample) the batch's counts."""
        target = is_target(batch)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            # from an input that is never None (x is None for posterior predictive)
            zeros_b = batch.library.new_zeros((batch.size, self.n_background))
            zeros_s = batch.library.new_zeros((batch.size, self.n_salient))
            with poutine.scale(scale=batch.kl_weight):
                z_b = pyro.sample(BACKGROUND_SITE, dist.Normal(zeros_b, 1.0).to_event(1))
                z_s = pyro.sample(SALIENT_SITE, salient_distribution(target, zeros_s, torch.ones_like(zeros_s)))
            decoder_input = broadcast_cat([z_b, z_s, covariate_onehot(batch.c, self.spec.covariate_sizes)])
            gene_logits = self.decoder(decoder_input)
            return self.likelihood.observe("x", gene_logits, batch.x if observe else None, batch.library)


class MOCVAEModel(ContrastiveVAEModel):
    """The comparative VAE fitted as a two-objective problem (MGDA min-norm weights).

    ``last_weight`` holds the background objective's weight ``a`` of the latest step.
    """

    def __init__(
        self,
        spec: DataSpec,
        n_background: int = 10,
        n_salient: int = 5,
        n_hidden: int = 128,
        n_layers: int = 1,
        likelihood: str = "nb",
    ) -> None:
        super().__init__(spec, n_background, n_salient, n_hidden, n_layers, likelihood)
        self.register_buffer("last_weight", torch.tensor(0.5))

    def objectives(self, elbo, guide, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_b, L_t)``: the negative ELBO of the batch's control cells and of its target
        cells (the other cells masked out), each on the ELBO's scale (``n_cells / B`` per cell)."""
        target = is_target(batch)
        with poutine.mask(mask=~target):
            loss_b = elbo.differentiable_loss(self, guide, batch)
        with poutine.mask(mask=target):
            loss_t = elbo.differentiable_loss(self, guide, batch)
        return loss_b, loss_t

    def training_loss(self, elbo, guide, batch: Batch) -> torch.Tensor:
        """``2 (a L_b + (1 - a) L_t)`` with MGDA's min-norm weight ``a`` of this step's two
        gradients over the pair's parameters (contract ``training_loss``). A batch without
        controls or without targets has one objective: its ELBO."""
        target = is_target(batch)
        if bool(target.all()) or not bool(target.any()):
            return elbo.differentiable_loss(self, guide, batch)
        loss_b, loss_t = self.objectives(elbo, guide, batch)
        params = [p for module in (self, guide) for p in module.parameters() if p.requires_grad]
        g_b = torch.autograd.grad(loss_b, params, retain_graph=True, allow_unused=True)
        g_t = torch.autograd.grad(loss_t, params, retain_graph=True, allow_unused=True)
        # the shared parameters (decoder, background encoder, dispersion): those both
        # objectives reach; the salient encoder only serves the target objective
        shared = [i for i in range(len(params)) if g_b[i] is not None and g_t[i] is not None]
        weight = min_norm_weight(
            torch.cat([g_b[i].reshape(-1) for i in shared]), torch.cat([g_t[i].reshape(-1) for i in shared])
        )
        self.last_weight.copy_(weight)
        return 2.0 * (weight * loss_b + (1.0 - weight) * loss_t)


class COCVAEModel(ContrastiveVAEModel):
    """The comparative VAE under the constraint ``nHSIC(z_b, z_s) <= independence_level`` on
    target cells, by a Lagrange multiplier (buffer ``multiplier``, saved with the model).

    Args:
        independence_level: epsilon, the allowed normalised HSIC (in [0, 1]).
        multiplier_lr: eta, the multiplier's gradient-ascent step size.
        (others: :class:`ContrastiveVAEModel`)
    """

    def __init__(
        self,
        spec: DataSpec,
        n_background: int = 10,
        n_salient: int = 5,
        n_hidden: int = 128,
        n_layers: int = 1,
        likelihood: str = "nb",
        independence_level: float = 0.05,
        multiplier_lr: float = 1.0,
    ) -> None:
        super().__init__(spec, n_background, n_salient, n_hidden, n_layers, likelihood)
        if not 0.0 <= independence_level <= 1.0:
            raise ValueError(f"independence_level must be in [0, 1], got {independence_level}")
        if not multiplier_lr > 0:
            raise ValueError(f"multiplier_lr must be > 0, got {multiplier_lr}")
        self.independence_level = float(independence_level)
        self.multiplier_lr = float(multiplier_lr)
        self.register_buffer("multiplier", torch.tensor(0.0))
        self.register_buffer("last_dependence", torch.tensor(float("nan")))

    def dependence(self, guide, batch: Batch) -> torch.Tensor | None:
        """nHSIC between the posterior means of z_b and z_s over the batch's target cells
        (differentiable), or None with fewer than 4 target cells."""
        target = is_target(batch)
        if int(target.sum()) < 4:
            return None
        post = guide.posterior(batch)
        return normalized_hsic(post["background"][0][target], post["salient"][0][target])

    def update_multiplier(self, violation: float) -> None:
        """One projected gradient-ascent step of the multiplier on the dual:
        ``lambda <- max(0, lambda + multiplier_lr * violation)``."""
        self.multiplier.copy_((self.multiplier + self.multiplier_lr * violation).clamp(min=0.0))

    def auxiliary_loss(self, guide, batch: Batch) -> torch.Tensor:
        """``lambda * n_cells * (nHSIC - epsilon)`` (contract ``auxiliary_loss``); in
        training mode also the multiplier's ascent step (using the lambda of this loss)."""
        dep = self.dependence(guide, batch)
        if dep is None:
            return batch.library.new_zeros(())
        violation = dep - self.independence_level
        loss = self.multiplier.detach() * batch.n_cells * violation
        if self.training and torch.is_grad_enabled():
            self.last_dependence.copy_(dep.detach())
            self.update_multiplier(float(violation.detach()))
        return loss
