"""DCD-FG: differentiable causal discovery of factor graphs (Lopez, Huetter, Pritchard &
Regev, "Large-Scale Differentiable Causal Discovery of Factor Graphs", NeurIPS 2022).

Generative story, for cell i with log-normalised expression ``y_i = log1p(1e4 x_i / l_i)``
(G genes), standardised per gene to ``z_i = (y_i - m) / s`` inside the model, and the set
``T_i`` of genes its perturbations target (labels name genes in ``var_names``,
:func:`~pyro_perturb.data.targets.target_matrix`)::

    U in {0,1}^(G x m)   gene -> factor mask      V in {0,1}^(m x G)  factor -> gene mask
    (per gene and factor one categorical: input of the factor, output of it, or neither;
     so a gene is never its own parent through a factor: the implied gene graph U V has
     an empty diagonal, as in the authors' code)
    f_ik = h_k((U[:, k] * z_i))                  factor values, h_k linear or an MLP
    z_ij | parents ~ Normal(b_j + sum_k V_kj w_kj f_ik, sigma_j)   for j not in T_i
    z_ij = level of the intervention                              for j in T_i

The gene graph is ``i -> j`` when some factor takes i and feeds j; it is constrained to be
a DAG. The observed site ``"x"`` is a distribution over ``y`` (event ``(G,)``) whose
``log_prob`` sums over the non-targeted genes only: under perfect interventions the
targeted genes' conditionals drop out of the likelihood (the paper's interventional
likelihood), so the held-out IWELBO per cell is the interventional log-likelihood
(``-I-NLL``) in units of ``y``.

Fitting: penalised maximum likelihood, as in the paper. The graph's parameters (mask
logits, weights, biases, noise scales) are point estimates (``nn.Parameter``\\ s of the
model; the guide samples nothing): the paper's method is a score-based structure search,
not a posterior over graphs, and a variational posterior over G x m categorical masks
would add a KL term per mask that the paper does not have. Training masks are drawn by
the straight-through Gumbel-softmax relaxation (one draw per step, temperature
``mask_temperature``); the loss adds (through the model's ``auxiliary_loss``, training
steps only)::

    n_cells * G * ( sparsity * mean_gk (p(U_gk) + p(V_kg)) / 2
                    + gamma * h + mu / 2 * h^2 )

with ``h = rho(P_V P_U) / rho_0`` the spectral radius of the m x m matrix of expected
masks ``P_V P_U`` (which equals that of the G x G expected gene graph ``P_U P_V``;
power iteration with persistent vectors, so it costs O(G m^2) at any G), normalised by its
value ``G m / 9`` at the uniform initialisation. ``n_cells * G`` puts the penalty on the scale of the paper's loss
(their NLL is a mean over cells and genes; the ELBO sums them). The augmented-Lagrangian
multiplier ``gamma`` and penalty weight ``mu`` are buffers (saved in checkpoints), updated
every ``constraint_every`` training steps: ``gamma += mu h``; ``mu *= constraint_growth``
when ``h`` did not fall below ``constraint_progress`` times its value at the last update.

Evaluation (eval mode: validation loss, held-out IWELBO, sampling) uses the paper's final
graph: each gene-factor pair is kept when ``p(in) + p(out) >= t`` (in its more likely
direction) with ``t`` the smallest threshold >= 0.5 that makes the graph acyclic (found by
bisection over the m x m factor graph). So every evaluated model is a DAG, and the
engine's best-state selection on the validation loss compares DAGs.

Sampling (``observe=False``): ancestral, by ``m + 1`` fixed-point passes (a path through an
acyclic factor graph visits each factor at most once) with fresh noise (the local site
``"sem_noise"``, present only when sampling), targeted genes set to their intervention
level: for a perturbation seen in training, the mean standardised value of its targeted
gene in its training cells; for one never seen, the mean of the seen levels (a knockout
of the average depth, in units of the gene's sd). So ``Run.sample`` / ATEs / predictions of
unseen knockouts work through the graph. The site's Normal has the conditional mean and
scale of each gene given its parents' drawn values (the drawn value at targeted genes).

``adjacency()`` returns the edge probabilities ``P(i -> j) = 1 - prod_k (1 - p(U_ik)
p(V_kj))`` (``is_probability=True``); :meth:`DCDFGModel.dag_adjacency` the thresholded DAG.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from ..contract import Adjacency
from ..data import Batch, DataSpec
from ..data.targets import target_matrix, targeted_genes
from ..normalize import log1p_normalize
from ..nn import ExpressionNormalizer

#: conditionals of a gene given its parent factors (the paper's linear and MLP variants)
CONDITIONALS = ("linear", "mlp")
# level (in gene sds) of a knockout when no training intervention gives one
_DEFAULT_KNOCKOUT_LEVEL = -2.0
# rows of the (rows, m, G) product of adjacency()
_ADJACENCY_CHUNK_ELEMENTS = 4_000_000


class GaussianKind:
    """What :func:`pyro_perturb.contract.likelihood_kind` reads: draws of ``log1p(1e4 x / l)``."""

    kind = "gaussian"


class InterventionalNormal(dist.Normal):
    """``Normal(loc, scale)`` per gene whose ``log_prob`` is 0 at the genes where
    ``observed`` is False (the targeted genes: their conditional drops out).

    With ``draw`` (the ancestral sample of the SEM), ``sample`` returns it: the draw is a
    sample of this Normal, whose loc is each gene's conditional mean given the drawn
    parents and whose noise is the SEM's.
    """

    def __init__(self, loc, scale, observed: torch.Tensor, draw: torch.Tensor | None = None, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self.observed = observed
        self.draw = draw

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(InterventionalNormal, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.observed = self.observed.expand(batch_shape)
        new.draw = None if self.draw is None else self.draw.expand(batch_shape)
        return new

    def log_prob(self, value):
        return super().log_prob(value).masked_fill(~self.observed, 0.0)

    def sample(self, sample_shape=torch.Size()):
        if self.draw is not None and len(sample_shape) == 0:
            return self.draw.detach()
        return super().sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        if self.draw is not None and len(sample_shape) == 0:
            return self.draw
        return super().rsample(sample_shape)


def power_iteration_radius(matrix: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int):
    """Spectral radius of a nonnegative square ``matrix`` by power iteration from the
    right / left vectors ``u``, ``v``; differentiable (``v^T M u / v^T u`` with the vectors
    held fixed is the eigenvalue's derivative). Returns (radius, u, v)."""
    with torch.no_grad():
        for _ in range(n_iter):
            u = F.normalize(matrix @ u, dim=0)
            v = F.normalize(matrix.T @ v, dim=0)
    return (v @ matrix @ u) / (v @ u).clamp_min(1e-12), u, v


def _is_acyclic(adjacency: torch.Tensor) -> bool:
    """Whether the (n, n) 0/1 matrix is the adjacency of a DAG (nilpotent)."""
    a = (adjacency > 0).to(torch.float64)
    power = a.clone()
    for _ in range(a.shape[0]):
        if not power.any():
            return True
        power = ((power @ a) > 0).to(torch.float64)
    return not power.any()


class DCDFGModel(PyroModule):
    """DCD-FG on log-normalised expression (module docstring).

    Args:
        spec: the data's :class:`DataSpec`; every perturbation names its targeted gene.
        n_factors: m, the number of factors (the paper uses 20).
        conditional: ``"linear"`` (factor = weighted sum of its input genes) or ``"mlp"``
            (each factor an MLP of its masked inputs; genes linear in the factors, as in
            the paper's MLP variant).
        n_hidden, n_layers: width and hidden layers of the factor MLPs (``"mlp"``; the
            paper: 16 and 2).
        mask_temperature: Gumbel-softmax temperature of the training masks.
        mask_init: initial probability that a gene is an input (and, equally, an output)
            of a factor; 1/3 (all three categories equally likely) is the authors' code's.
        sparsity: lambda, weight of the mean mask probability (the paper: 0.1).
        constraint_mu_init: initial augmented-Lagrangian penalty weight mu.
        constraint_growth: factor on mu when the constraint did not progress.
        constraint_progress: required ratio of h between two updates.
        constraint_every: training steps between updates of gamma and mu (200: with 50,
            the constraint was enforced before the likelihood had found the edges'
            directions, and 100-gene fits often came out reversed; see
            bench/results/graph_dcdfg/README.md).
        unmatched_targets: ``"error"`` or ``"ignore"`` (:func:`target_matrix`).
    """

    max_plate_nesting = 1
    composes = True  # a combination targets the union of its genes
    likelihood = GaussianKind()

    def __init__(
        self,
        spec: DataSpec,
        n_factors: int = 20,
        conditional: str = "linear",
        n_hidden: int = 16,
        n_layers: int = 2,
        mask_temperature: float = 1.0,
        mask_init: float = 1.0 / 3.0,
        sparsity: float = 0.1,
        constraint_mu_init: float = 1e-2,
        constraint_growth: float = 10.0,
        constraint_progress: float = 0.9,
        constraint_every: int = 200,
        unmatched_targets: str = "error",
    ) -> None:
        super().__init__()
        if conditional not in CONDITIONALS:
            raise ValueError(f"conditional={conditional!r}; choose one of {CONDITIONALS}")
        G, m = spec.n_genes, n_factors
        self.spec = spec
        self.n_factors = m
        self.n_latent = m
        self.conditional = conditional
        self.mask_temperature = float(mask_temperature)
        self.sparsity = float(sparsity)
        self.constraint_growth = float(constraint_growth)
        self.constraint_progress = float(constraint_progress)
        self.constraint_every = int(constraint_every)
        self.normalizer = ExpressionNormalizer(G)
        self.register_buffer("targets", target_matrix(spec, unmatched_targets), persistent=False)

        # mask logits per gene and factor: (input of the factor, output of it, neither)
        if not 0.0 < mask_init < 0.5:
            raise ValueError(f"mask_init must be in (0, 0.5), got {mask_init!r}")
        neither = math.log((1.0 - 2.0 * mask_init) / mask_init)
        self.mask_logits = nn.Parameter(torch.tensor([0.0, 0.0, neither]).expand(G, m, 3).clone())
        self.factor_to_gene = nn.Parameter(torch.randn(m, G) / math.sqrt(m))
        self.gene_bias = nn.Parameter(torch.zeros(G))
        self.log_scale = nn.Parameter(torch.zeros(G))
        if conditional == "linear":
            self.gene_to_factor = nn.Parameter(torch.randn(G, m) / math.sqrt(G))
        else:
            gain = nn.init.calculate_gain("leaky_relu")
            self.gene_to_hidden = nn.Parameter(torch.randn(m, n_hidden, G) * gain / math.sqrt(G))
            self.hidden_bias = nn.Parameter(torch.zeros(n_layers, m, n_hidden))
            self.hidden_weights = nn.Parameter(
                torch.randn(max(n_layers - 1, 1), m, n_hidden, n_hidden) * gain / math.sqrt(n_hidden)
            )
            self.hidden_to_factor = nn.Parameter(torch.randn(m, n_hidden) / math.sqrt(n_hidden))
            self.n_layers = n_layers

        # augmented Lagrangian state and the power-iteration vectors (saved in checkpoints)
        self.register_buffer("lagrange_gamma", torch.zeros(()))
        self.register_buffer("lagrange_mu", torch.tensor(float(constraint_mu_init)))
        self.register_buffer("constraint_last", torch.tensor(float("inf")))
        self.register_buffer("constraint_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("power_u", torch.full((m,), 1.0 / math.sqrt(m)))
        self.register_buffer("power_v", torch.full((m,), 1.0 / math.sqrt(m)))
        # h's unit: the radius when every gene is an input and an output of every factor
        # with probability 1/3 (the authors' initialisation): G m / 9, whatever mask_init is
        self.register_buffer("constraint_scale", torch.tensor(G * m / 9.0))
        # intervention levels (standardised units), accumulated over training cells
        self.register_buffer("level_sum", torch.zeros(spec.n_perturbations))
        self.register_buffer("level_count", torch.zeros(spec.n_perturbations))

    # ------------------------------------------------------------------ masks and graph

    def edge_probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``p(U)`` (G, m) and ``p(V)`` (m, G): probabilities that a gene is an input /
        an output of each factor."""
        p = torch.softmax(self.mask_logits, dim=-1)
        return p[..., 0], p[..., 1].T

    def _sampled_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One straight-through Gumbel-softmax draw of (U, V) (training)."""
        draw = F.gumbel_softmax(self.mask_logits, tau=self.mask_temperature, hard=True, dim=-1)
        return draw[..., 0], draw[..., 1].T

    @torch.no_grad()
    def dag_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final graph's (U, V), 0/1 floats: pairs with ``p(in) + p(out) >= t`` in their
        more likely direction, ``t >= 0.5`` the smallest threshold giving a DAG."""
        p = torch.softmax(self.mask_logits.detach(), dim=-1)
        p_edge = p[..., 0] + p[..., 1]
        incoming = p[..., 0] >= p[..., 1]

        def masks(t: float):
            keep = p_edge >= t
            return (keep & incoming).to(p.dtype), (keep & ~incoming).T.to(p.dtype)

        def acyclic(t: float) -> bool:
            u, v = masks(t)
            return _is_acyclic(v @ u)

        candidates = torch.unique(p_edge[p_edge >= 0.5]).tolist()  # ascending
        if not candidates or acyclic(0.5):
            return masks(0.5)
        lo, hi = 0, len(candidates)  # keeping values >= candidates[hi] (hi = len: none) is acyclic
        while lo < hi:
            mid = (lo + hi) // 2
            if acyclic(candidates[mid]):
                hi = mid
            else:
                lo = mid + 1
        return masks(candidates[lo] if lo < len(candidates) else 1.1)

    def spectral_radius(self, n_iter: int = 20) -> torch.Tensor:
        """``rho(P_V P_U)`` (differentiable), by power iteration; in training the vectors
        persist between calls (warm starts)."""
        p_in, p_out = self.edge_probabilities()
        radius, u, v = power_iteration_radius(p_out @ p_in, self.power_u, self.power_v, n_iter)
        if self.training:
            self.power_u.copy_(u)
            self.power_v.copy_(v)
        return radius

    def constraint(self) -> torch.Tensor:
        """``h``: the spectral radius in units of its value at the uniform masks (G m / 9)."""
        return self.spectral_radius() / self.constraint_scale

    def adjacency(self) -> Adjacency:
        """Edge probabilities ``P(i -> j) = 1 - prod_k (1 - p(U_ik) p(V_kj))`` (G, G)."""
        with torch.no_grad():
            p_in, p_out = self.edge_probabilities()
            G, m = p_in.shape
            rows = max(1, _ADJACENCY_CHUNK_ELEMENTS // max(1, m * G))
            out = []
            for start in range(0, G, rows):
                prod = p_in[start : start + rows, :, None] * p_out[None]  # (r, m, G)
                out.append(-torch.expm1(torch.log1p(-prod.clamp_max(1 - 1e-7)).sum(1)))
            weights = torch.cat(out).cpu().numpy()
        np.fill_diagonal(weights, 0.0)
        return Adjacency(weights, True, list(self.spec.genes))

    def dag_adjacency(self) -> np.ndarray:
        """(G, G) bool: the final graph (:meth:`dag_masks`), a DAG."""
        u, v = self.dag_masks()
        adjacency = ((u @ v) > 0).cpu().numpy()
        np.fill_diagonal(adjacency, False)
        return adjacency

    # ------------------------------------------------------------------ conditionals

    def _masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sampled_masks() if self.training else self.dag_masks()

    def _standardise(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.normalizer.gene_mean) / self.normalizer.gene_std.clamp_min(1e-2)

    def factor_values(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``(..., B, m)`` factor values of standardised expression ``z`` ``(..., B, G)``
        through the input mask ``u`` (G, m)."""
        if self.conditional == "linear":
            return z @ (u * self.gene_to_factor)
        weights = self.gene_to_hidden * u.T.unsqueeze(1)  # (m, H, G)
        h = torch.einsum("...g,khg->...kh", z, weights) + self.hidden_bias[0]
        for layer in range(1, self.n_layers):
            h = F.leaky_relu(h)
            h = torch.einsum("...kh,kjh->...kj", h, self.hidden_weights[layer - 1]) + self.hidden_bias[layer]
        return (F.leaky_relu(h) * self.hidden_to_factor).sum(-1)

    def conditional_mean(self, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Each gene's conditional mean given its parents, standardised ``(..., B, G)``."""
        return self.factor_values(z, u) @ (v * self.factor_to_gene) + self.gene_bias

    def _levels(self) -> torch.Tensor:
        """(T,) intervention levels (standardised): learned where seen, else their mean."""
        seen = self.level_count > 0
        fallback = (
            (self.level_sum[seen] / self.level_count[seen]).mean()
            if bool(seen.any())
            else self.level_sum.new_tensor(_DEFAULT_KNOCKOUT_LEVEL)
        )
        return torch.where(seen, self.level_sum / self.level_count.clamp_min(1.0), fallback)

    def _intervention_values(self, d: torch.Tensor) -> torch.Tensor:
        """(B, G) standardised value of each targeted gene (mean over the perturbations
        targeting it)."""
        active = (d.abs() > 0).to(self.targets.dtype)
        total = (active * self._levels()) @ self.targets
        return total / (active @ self.targets).clamp_min(1.0)

    @torch.no_grad()
    def _accumulate_levels(self, z: torch.Tensor, d: torch.Tensor) -> None:
        active = (d.abs() > 0).to(z.dtype) * (self.targets.sum(1) > 0)
        at_target = z @ self.targets.T  # (B, T): the value of each perturbation's gene
        self.level_sum += (active * at_target).sum(0)
        self.level_count += active.sum(0)

    # ------------------------------------------------------------------ model

    def forward(self, batch: Batch, observe: bool = True):
        """Score the batch's log-normalised expression (or draw it, ``observe=False``)."""
        targeted = targeted_genes(batch.d, self.targets)
        mean, std = self.normalizer.gene_mean, self.normalizer.gene_std.clamp_min(1e-2)
        scale = std * self.log_scale.exp()
        u, v = self._masks()
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            if observe and batch.x is not None:
                y = log1p_normalize(batch.x, batch.library)
                z = self._standardise(y)
                if self.training:
                    self._accumulate_levels(z, batch.d)
                loc = mean + std * self.conditional_mean(z, u, v)
                return pyro.sample("x", InterventionalNormal(loc, scale, ~targeted).to_event(1), obs=y)
            noise = pyro.sample("sem_noise", dist.Normal(batch.library.new_zeros(()), 1.0).expand(
                [batch.size, self.spec.n_genes]).to_event(1))
            level = self._intervention_values(batch.d)
            z = torch.where(targeted, level, self.gene_bias + self.log_scale.exp() * noise)
            for _ in range(self.n_factors + 1):
                z = torch.where(targeted, level, self.conditional_mean(z, u, v) + self.log_scale.exp() * noise)
            loc = torch.where(targeted, mean + std * level, mean + std * self.conditional_mean(z, u, v))
            draw = mean + std * z
            return pyro.sample("x", InterventionalNormal(loc, scale.expand_as(loc), ~targeted, draw=draw).to_event(1))

    # ------------------------------------------------------------------ penalties

    def auxiliary_loss(self, guide, batch: Batch) -> torch.Tensor:
        """Sparsity and augmented-Lagrangian acyclicity penalty (module docstring); every
        ``constraint_every`` calls (training steps) it updates gamma and mu."""
        h = self.constraint()
        p_in, p_out = self.edge_probabilities()
        sparsity = 0.5 * (p_in.mean() + p_out.mean())
        if self.training:
            self._update_lagrangian(h.detach())
        penalty = self.sparsity * sparsity + self.lagrange_gamma * h + 0.5 * self.lagrange_mu * h.square()
        return batch.n_cells * self.spec.n_genes * penalty

    @torch.no_grad()
    def _update_lagrangian(self, h: torch.Tensor) -> None:
        self.constraint_steps += 1
        if int(self.constraint_steps) % self.constraint_every:
            return
        self.lagrange_gamma += self.lagrange_mu * h
        if bool(h > self.constraint_progress * self.constraint_last):
            self.lagrange_mu.mul_(self.constraint_growth).clamp_(max=1e12)
        self.constraint_last.copy_(h)


__all__ = ["CONDITIONALS", "DCDFGModel", "InterventionalNormal", "power_iteration_radius"]
