"""NODAGS-Flow: a nonlinear cyclic structural equation model of the genes, learned from
interventions (docs/models.md, "NODAGS-Flow").

Each cell's log-normalised expression ``y = log1p(1e4 x / l)`` (G genes), standardised per
gene (``s = (y - m) / sd``, ``m`` and ``sd`` set from the first training batch), is the
unique fixed point of a contractive map::

    s = U_I (F(s) + e) + (1 - U_I) c,     e_g ~ Normal(mu_g, sigma_g)

where ``I`` is the set of genes the cell's perturbations target (``U_I`` zeroes them: a
perfect intervention), ``c`` their intervention values and ``F`` a residual map with
``Lip(F) < 1`` whose input ``s_i`` reaches output ``j`` only through the learned gate of
edge i -> j. By the change of variables (Sethuraman et al. 2023, eq. 5), the density of the
non-targeted genes given the targeted ones is::

    log p(s) = sum_{g not in I} log N(s_g - F(s)_g; mu_g, sigma_g) + log |det(I - U_I J_F(s))|

and the site ``"x"`` scores ``y`` with it (``- sum_{g not in I} log sd_g`` for the
standardisation): the targeted genes' own density is dropped, so the held-out IWELBO per
cell is minus the interventional NLL (I-NLL) on the scale of ``log1p(1e4 x / l)``.

The log-determinant is ``-sum_k tr((U_I J_F)^k) / k``: in training, the series truncated
at ``n_power_series`` terms (or with a Russian-roulette tail, unbiased) with Hutchinson's
trace estimator on vector-Jacobian products; in evaluation (``model.eval()``) exactly
(Jacobian and ``slogdet``) up to ``exact_logdet_max_genes`` genes.

Parameters are point estimates (penalised maximum likelihood, as in the paper): there are
no per-cell latents (a cell's noise ``e`` is a deterministic function of ``y``), and a
prior over the network weights would add nothing the L1 penalty does not already say. The
guide (:class:`pyro_perturb.guides.nodags.NODAGSGuide`) samples nothing.

Reference: Sethuraman, Lopez, Mohan, Fekri, Biancalani, Hütter, "NODAGS-Flow: Nonlinear
Cyclic Causal Structure Learning", AISTATS 2023 (arXiv 2301.01849).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule
from torch import nn

from ..contract import Adjacency
from ..data import Batch, DataSpec
from ..data.targets import target_matrix, targeted_genes
from ..normalize import log1p_normalize

#: how ``F`` maps the gated inputs: a one-hidden-layer tanh network per gene, or linear
MECHANISMS = ("mlp", "linear")
#: the training estimator of the log-determinant's power series
LOGDET_ESTIMATORS = ("truncated", "roulette")
#: Russian roulette: probability of stopping after each extra term
_ROULETTE_STOP = 0.5
#: power-iteration steps per spectral norm when the matrix is too large for an exact one
_POWER_ITERATIONS = 3
#: largest min(shape) of a matrix whose spectral norm is computed exactly (svdvals)
_EXACT_NORM_MAX = 256

NODAGS_TRAIN_DEFAULTS = dict(lr=1e-2, batch_size=256, max_epochs=150, early_stopping_patience=20)


class ContractiveGatedMap(nn.Module):
    """``F: R^G -> R^G`` with ``Lip(F) <= lipschitz < 1`` and a gate per edge i -> j.

    ``mechanism="mlp"``: ``F_j(s) = sum_k v_jk tanh(sum_i A_jki s_i + b_jk)`` with
    ``A_jki = r * gate_ij * tanh(w_jki) / sqrt(H)`` and ``||v_j|| <= 1``, where ``r`` scales
    the stacked ``(G H, G)`` matrix ``A`` to spectral norm ``<= lipschitz``; since tanh is
    1-Lipschitz and the output layer is block diagonal, ``Lip(F) <= max_j ||v_j|| ||A||_2
    <= lipschitz``. ``mechanism="linear"``: ``F(s) = s W`` with ``W_ij = r gate_ij
    tanh(w_ij)``, ``||W||_2 <= lipschitz``. Either way ``|dF_j / ds_i| <= r gate_ij``: the
    L1 penalty on the gates cannot be undone by larger weights. The diagonal is fixed at 0.

    Args:
        n_genes: G.
        n_hidden: H (mlp only).
        mechanism: ``"mlp"`` or ``"linear"``.
        lipschitz: the bound, in (0, 1).
    """

    def __init__(self, n_genes: int, n_hidden: int, mechanism: str, lipschitz: float) -> None:
        super().__init__()
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism={mechanism!r}; choose one of {MECHANISMS}")
        if not 0.0 < lipschitz < 1.0:
            raise ValueError(f"lipschitz must be in (0, 1), got {lipschitz}")
        self.n_genes, self.mechanism, self.lipschitz = n_genes, mechanism, float(lipschitz)
        self.n_hidden = n_hidden if mechanism == "mlp" else 1
        # gates start at sigmoid(0) = 0.5: every edge open, none preferred
        self.gate_logit = nn.Parameter(torch.zeros(n_genes, n_genes))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(n_genes))
        if mechanism == "mlp":
            self.w_in = nn.Parameter(torch.randn(n_genes, self.n_hidden, n_genes))
            self.b_hidden = nn.Parameter(0.1 * torch.randn(n_genes, self.n_hidden))
            self.v_out = nn.Parameter(torch.randn(n_genes, self.n_hidden) / math.sqrt(self.n_hidden))
        else:
            self.w_in = nn.Parameter(0.5 * torch.randn(n_genes, n_genes))
        # power iteration's running left singular vector (large G only)
        self.register_buffer("power_u", torch.zeros(0))

    def gates(self) -> torch.Tensor:
        """``(G, G)`` gates in (0, 1), ``[i, j]`` for edge i -> j, zero diagonal."""
        return torch.sigmoid(self.gate_logit) * self.off_diagonal

    def _spectral_norm(self, matrix: torch.Tensor) -> torch.Tensor:
        if min(matrix.shape) <= _EXACT_NORM_MAX:
            return torch.linalg.matrix_norm(matrix, ord=2)
        with torch.no_grad():
            u = self.power_u
            if u.shape != (matrix.shape[0],):
                u = torch.randn(matrix.shape[0], device=matrix.device, dtype=matrix.dtype)
            for _ in range(_POWER_ITERATIONS):
                v = torch.nn.functional.normalize(matrix.T @ u, dim=0)
                u = torch.nn.functional.normalize(matrix @ v, dim=0)
            self.power_u = u
        return u @ matrix @ v

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The contracted weights: mlp ``(A (G, H, G) [j, k, i], v (G, H))``; linear
        ``(W (G, G) [i, j], None)``."""
        gates = self.gates()
        if self.mechanism == "linear":
            w = gates * torch.tanh(self.w_in)
            norm = self._spectral_norm(w)
        else:
            # A[j, k, i] = gate_ij tanh(w_jki) / sqrt(H)
            w = gates.T.unsqueeze(1) * torch.tanh(self.w_in) / math.sqrt(self.n_hidden)
            norm = self._spectral_norm(w.reshape(-1, self.n_genes))
        w = w * (self.lipschitz / torch.clamp(norm, min=self.lipschitz))
        if self.mechanism == "linear":
            return w, None
        v_norm = self.v_out.norm(dim=1, keepdim=True)
        return w, self.v_out / torch.clamp(v_norm, min=1.0)

    def edge_strength(self) -> torch.Tensor:
        """``(G, G)`` bound on ``|dF_j / ds_i|`` over all inputs, ``[i, j]`` for i -> j."""
        w, v = self.weights()
        if v is None:
            return w.abs()
        return (w.norm(dim=1) * v.norm(dim=1, keepdim=True)).T

    def jacobian(self, s: torch.Tensor) -> torch.Tensor:
        """``J_F(s)`` ``(..., G, G)``, entry ``[j, i] = dF_j / ds_i``, in closed form."""
        w, v = self.weights()
        if v is None:
            return w.T.expand(s.shape[:-1] + w.shape)
        hidden = torch.tanh(torch.einsum("...i,jki->...jk", s, w) + self.b_hidden)
        return torch.einsum("...jk,jki->...ji", (1.0 - hidden.square()) * v, w)

    def forward(self, s: torch.Tensor, weights: tuple | None = None) -> torch.Tensor:
        """``F(s)``: ``(..., G) -> (..., G)`` (``weights``: :meth:`weights`, to reuse them)."""
        w, v = self.weights() if weights is None else weights
        if v is None:
            return s @ w
        hidden = torch.tanh(torch.einsum("...i,jki->...jk", s, w) + self.b_hidden)
        return (hidden * v).sum(-1)


def power_series_logdet(
    fn, s: torch.Tensor, observed: torch.Tensor, n_terms: int, n_samples: int = 1,
    roulette: bool = False, create_graph: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson estimate of ``log|det(I - U J_fn(s))| = -sum_k tr((U J)^k) / k``.

    Args:
        fn: a map ``(..., G) -> (..., G)`` with ``Lip < 1`` (the series converges).
        s: ``(..., G)`` points.
        observed: ``(..., G)`` float, 1 on the rows ``U`` keeps (non-targeted genes).
        n_terms: terms of the series computed exactly (roulette: before the random tail).
        n_samples: Rademacher probe vectors averaged.
        roulette: add a Russian-roulette tail (terms beyond ``n_terms`` while a coin with
            stopping probability 1/2 says go on, each reweighted by 1 / P(reached)):
            unbiased for the infinite series.
        create_graph: keep the graph for gradients of the estimate.

    Returns:
        ``(logdet (...), fn(s) (..., G))``: ``fn(s)`` evaluated on the same graph.
    """
    with torch.enable_grad():
        s = s.detach().requires_grad_(True)
        out = fn(s)
        n_total, weights = n_terms, [1.0] * n_terms
        if roulette:
            extra = 0
            while float(torch.rand((), device=s.device)) > _ROULETTE_STOP:
                extra += 1
            weights += [(1.0 - _ROULETTE_STOP) ** -(r + 1) for r in range(extra)]
            n_total += extra
        total = s.new_zeros(s.shape[:-1])
        for _ in range(n_samples):
            probe = torch.empty_like(s).bernoulli_(0.5) * 2.0 - 1.0
            row = probe
            for k in range(1, n_total + 1):
                # row <- row U J (a vector-Jacobian product); tr((UJ)^k) ~ row . probe
                (row,) = torch.autograd.grad(out, s, row * observed, create_graph=create_graph, retain_graph=True)
                total = total - weights[k - 1] * (row * probe).sum(-1) / k
    return total / n_samples, out


def exact_logdet(fn, s: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``log|det(I - U J_fn(s))|`` from the full Jacobian, ``(...)`` for ``s`` ``(..., G)``:
    ``fn.jacobian(s)`` when the map has one (:class:`ContractiveGatedMap`), else by
    ``torch.func``."""
    flat = s.detach().reshape(-1, s.shape[-1])
    if callable(getattr(fn, "jacobian", None)):
        jac = fn.jacobian(flat)
    else:
        jac = torch.func.vmap(torch.func.jacrev(fn))(flat)  # (N, G_out, G_in)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    matrix = eye - observed.reshape(-1, s.shape[-1]).unsqueeze(-1) * jac
    return torch.linalg.slogdet(matrix).logabsdet.reshape(s.shape[:-1])


class InterventionalSEM(TorchDistribution):
    """The observed site of :class:`NODAGSModel`: a distribution over ``y`` ``(G,)`` per
    cell whose ``log_prob`` is the interventional log-likelihood (module docstring) and
    whose ``sample`` is the SEM's fixed point under fresh noise.

    Args:
        model: the :class:`NODAGSModel` (its map, noise and standardisation).
        targeted: ``(B, G)`` bool, the genes each cell's perturbations target.
        level_loc, level_scale: ``(B, G)`` intervention values' mean and sd in ``y``
            units (used on targeted genes when sampling).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, model: "NODAGSModel", targeted: torch.Tensor, level_loc: torch.Tensor,
                 level_scale: torch.Tensor, batch_shape=None, validate_args=None) -> None:
        self.model, self.targeted = model, targeted
        self.level_loc, self.level_scale = level_loc, level_scale
        batch_shape = targeted.shape[:-1] if batch_shape is None else torch.Size(batch_shape)
        super().__init__(batch_shape, targeted.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return InterventionalSEM(self.model, self.targeted, self.level_loc, self.level_scale, batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lp = self.model.interventional_log_prob(value, self.targeted)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def predictive_normal(self) -> dist.Normal:
        """One draw of ``y`` per batch element as a Normal of negligible width: how the
        model effects (:mod:`pyro_perturb.evaluate.predictive`) read this site, their
        particles averaging over the SEM's noise and intervention values."""
        y = self.sample()
        return dist.Normal(y, torch.full_like(y, 1e-6))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        with torch.no_grad():
            levels = self.level_loc + self.level_scale * torch.randn_like(self.level_loc.expand(shape))
            return self.model.fixed_point(self.targeted.expand(shape), levels)


class NODAGSModel(PyroModule):
    """Interventional likelihood of a contractive cyclic SEM of the genes.

    Args:
        spec: the data's :class:`DataSpec`; every perturbation must name its targeted gene
            (``var_names``) unless ``unmatched_targets="ignore"``.
        n_hidden: hidden units per gene of ``F`` (``mechanism="mlp"``).
        mechanism: ``"mlp"`` (nonlinear) or ``"linear"``.
        lipschitz: Lipschitz bound of ``F``, in (0, 1) (the paper: 0.9).
        l1_penalty: weight of ``sum(gates)`` per cell (the paper's lambda_c), a global
            factor of the model (``"graph_l1_penalty"``).
        n_power_series: terms of the log-det series in training.
        n_hutchinson: probe vectors of the trace estimator in training.
        logdet_estimator: ``"truncated"`` or ``"roulette"`` (unbiased tail).
        exact_logdet_max_genes: at evaluation (``eval()``), the exact log-det up to this
            many genes (above: the estimator with 4x the probes).
        unmatched_targets: see :data:`pyro_perturb.data.targets.UNMATCHED_TARGETS`.
    """

    max_plate_nesting = 1

    def __init__(
        self,
        spec: DataSpec,
        n_hidden: int = 16,
        mechanism: str = "mlp",
        lipschitz: float = 0.9,
        l1_penalty: float = 0.03,
        n_power_series: int = 10,
        n_hutchinson: int = 1,
        logdet_estimator: str = "truncated",
        exact_logdet_max_genes: int = 64,
        unmatched_targets: str = "error",
    ) -> None:
        super().__init__()
        if logdet_estimator not in LOGDET_ESTIMATORS:
            raise ValueError(f"logdet_estimator={logdet_estimator!r}; choose one of {LOGDET_ESTIMATORS}")
        self.spec = spec
        self.likelihood = SimpleNamespace(kind="gaussian")
        n_genes = spec.n_genes
        self.sem = ContractiveGatedMap(n_genes, n_hidden, mechanism, lipschitz)
        self.l1_penalty = l1_penalty
        self.n_power_series, self.n_hutchinson = n_power_series, n_hutchinson
        self.logdet_estimator = logdet_estimator
        self.exact_logdet_max_genes = exact_logdet_max_genes
        self.register_buffer("targets", target_matrix(spec, unmatched_targets))
        # per-gene standardisation of y, set from the first training batch
        self.register_buffer("y_loc", torch.zeros(n_genes))
        self.register_buffer("y_scale", torch.ones(n_genes))
        self.register_buffer("standardised", torch.zeros((), dtype=torch.bool))
        self.noise_loc = nn.Parameter(torch.zeros(n_genes))
        self.noise_log_scale = nn.Parameter(torch.zeros(n_genes))
        # intervention values of each perturbation's gene, in y units: they start at 0 (no
        # counts, a knockout) and are fitted to the targeted genes' values (auxiliary_loss);
        # a perturbation without training cells keeps the knockout level
        self.level_loc = nn.Parameter(torch.zeros(spec.n_perturbations))
        self.level_log_scale = nn.Parameter(torch.full((spec.n_perturbations,), math.log(0.5)))

    # ------------------------------------------------------------------ the SEM
    def _standardise(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_loc) / self.y_scale

    @torch.no_grad()
    def _initialise_standardisation(self, y: torch.Tensor) -> None:
        if bool(self.standardised) or y.shape[0] < 2:
            return
        self.y_loc.copy_(y.mean(0))
        self.y_scale.copy_(y.std(0).clamp_min(1e-3))
        self.standardised.fill_(True)

    def interventional_log_prob(self, y: torch.Tensor, targeted: torch.Tensor) -> torch.Tensor:
        """``log p(y_O | y_I)`` ``(...)`` of ``y`` ``(..., G)`` (module docstring)."""
        s = self._standardise(y)
        observed = (~targeted).to(s.dtype).expand(s.shape)
        if not self.training and s.shape[-1] <= self.exact_logdet_max_genes:
            fs = self.sem(s)
            logdet = exact_logdet(self.sem, s, observed)
        else:
            n_samples = self.n_hutchinson if self.training else 4 * self.n_hutchinson
            logdet, fs = power_series_logdet(
                self.sem, s, observed, self.n_power_series, n_samples,
                roulette=self.logdet_estimator == "roulette" and self.training,
                create_graph=torch.is_grad_enabled(),
            )
            if not torch.is_grad_enabled():
                logdet, fs = logdet.detach(), fs.detach()
        noise = dist.Normal(self.noise_loc, self.noise_log_scale.exp())
        per_gene = (noise.log_prob(s - fs) - self.y_scale.log()) * observed
        return per_gene.sum(-1) + logdet

    @torch.no_grad()
    def fixed_point(self, targeted: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor | None = None,
                    max_iterations: int = 500, tolerance: float = 1e-6) -> torch.Tensor:
        """``y`` ``(..., G)`` solving ``s = U (F(s) + e) + (1 - U) c`` by iteration (a
        contraction: the error shrinks by ``lipschitz`` each step). ``levels``: the targeted
        genes' values in ``y`` units; ``noise``: ``e`` in standardised units (default: drawn)."""
        c = self._standardise(levels)
        if noise is None:
            noise = self.noise_loc + self.noise_log_scale.exp() * torch.randn_like(c)
        s = torch.where(targeted, c, noise)
        weights = self.sem.weights()
        for _ in range(max_iterations):
            new = torch.where(targeted, c, self.sem(s, weights) + noise)
            done = (new - s).abs().max() < tolerance
            s = new
            if done:
                break
        return self.y_loc + self.y_scale * s

    def noise(self, y: torch.Tensor, targeted: torch.Tensor) -> torch.Tensor:
        """The cells' SEM noise ``e = s - F(s)`` ``(B, G)``, standardised units, 0 on targeted genes."""
        s = self._standardise(y)
        return torch.where(targeted, torch.zeros_like(s), s - self.sem(s))

    # ------------------------------------------------------------------ the zoo's contract
    def _levels(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targeted genes ``(B, G)`` bool and their intervention level's mean and sd."""
        targets = self.targets
        hits = (batch.d.abs() > 0).to(targets.dtype)
        per_gene = (hits @ targets).clamp_min(1.0)
        loc = (hits @ (targets * self.level_loc.unsqueeze(-1))) / per_gene
        scale = (hits @ (targets * self.level_log_scale.exp().unsqueeze(-1))) / per_gene
        return targeted_genes(batch.d, targets), loc, scale.clamp_min(1e-4)

    def forward(self, batch: Batch, observe: bool = True) -> torch.Tensor:
        """Score (or, with ``observe=False``, draw) ``y = log1p(1e4 x / l)``."""
        y = log1p_normalize(batch.x, batch.library) if (observe and batch.x is not None) else None
        if y is not None and self.training:
            self._initialise_standardisation(y)
        targeted, loc, scale = self._levels(batch)
        if self.l1_penalty > 0:
            # the paper's penalised likelihood, mean NLL + l1 * sum(gates), on the ELBO's
            # scale: a global term (counted once per step, like a prior on global weights),
            # so that the validation loss, hence early stopping and the state kept, is the
            # penalised objective too; the IWELBO counts the cells' sites only (pure I-NLL)
            # (a Delta's log-density rather than pyro.factor, whose Unit copies its argument
            # to the default device)
            log_factor = -batch.n_cells * self.l1_penalty * self.sem.gates().sum()
            zero = log_factor.new_zeros(()).detach()
            pyro.sample("graph_l1_penalty", dist.Delta(zero, log_density=log_factor), obs=zero)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            return pyro.sample("x", InterventionalSEM(self, targeted, loc, scale), obs=y)

    def auxiliary_loss(self, guide, batch: Batch) -> torch.Tensor:
        """The intervention levels' negative log-likelihood on the targeted genes, on the
        ELBO's scale: it fits the levels used when predicting, outside the graph's
        likelihood (which drops the targeted genes)."""
        if batch.x is None:
            return batch.d.new_zeros(())
        y = log1p_normalize(batch.x, batch.library)
        targeted, loc, scale = self._levels(batch)
        level_nll = -(dist.Normal(loc, scale).log_prob(y) * targeted).sum()
        return level_nll * (batch.n_cells / batch.size)

    def adjacency(self) -> Adjacency:
        """The learned graph: ``weights[i, j]`` bounds ``|dF_j / ds_i|`` (edge i -> j, in
        standard deviations of gene j per standard deviation of gene i): the gate times
        the contraction's scale, a magnitude (not a probability)."""
        return Adjacency(self.sem.edge_strength().detach(), False, list(self.spec.genes))


__all__ = [
    "ContractiveGatedMap",
    "InterventionalSEM",
    "LOGDET_ESTIMATORS",
    "MECHANISMS",
    "NODAGSModel",
    "NODAGS_TRAIN_DEFAULTS",
    "exact_logdet",
    "power_series_logdet",
]
