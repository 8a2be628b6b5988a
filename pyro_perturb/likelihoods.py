"""Count likelihoods shared by every model: ``x_ig ~ NB(l_i * softmax(f(z_i))_g, theta_g)``.

The decoder returns unnormalised gene logits ``f(z)``; the library size ``l_i`` is
observed. The NB is parameterised as Pyro's ``NegativeBinomial(total_count=theta,
logits=log l + log_softmax(f) - log theta)``, whose mean is ``l * softmax(f)``.

The count distributions are :class:`NegativeBinomialCounts` and :class:`PoissonCounts`:
Pyro's ``NegativeBinomial`` and ``Poisson`` with the same values, samples and moments,
whose ``log_prob`` computes the terms that depend only on the counts and ``theta``
(``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``, and its ``digamma`` gradient)
once per cell and gene instead of once per ELBO / IWELBO particle. Those terms were
~30% of a SAMS-VAE training step at 5 particles (bench/results/train_throughput.md).

A zero-inflated NB (kind ``"zinb"``, :class:`ZeroInflatedNegativeBinomialCounts`, scVI's
``x ~ pi * delta_0 + (1 - pi) * NB``) takes its zero-inflation logits ``logit(pi)``
``(..., B, G)`` from the decoder, so only models whose decoder gives them use it (scVI);
the shared ``likelihood`` hyperparameter of the other models stays :data:`LIKELIHOODS`.
:class:`LibraryPrior` is scVI's per-batch prior of a latent log library size.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroParam
from torch import nn

from .normalize import log1p_normalize

#: likelihoods of a decoder that gives gene logits only (the ``likelihood`` hyperparameter
#: of most models)
LIKELIHOODS = ("nb", "poisson", "gaussian")
#: every kind of :class:`CountLikelihood`: ``"zinb"`` also needs zero-inflation logits
COUNT_LIKELIHOODS = LIKELIHOODS + ("zinb",)


class NegativeBinomialCounts(dist.NegativeBinomial):
    """Pyro's ``NegativeBinomial(total_count, logits=...)`` with a cheaper ``log_prob``.

    ``total_count`` (``theta``) is kept as given (e.g. ``(G,)``) next to the broadcast
    copy, so that in::

        log p(x) = (theta + x) * logsigmoid(-logits) + x * logits
                   + lgamma(theta + x) - lgamma(theta) - lgamma(x + 1)

    the ``lgamma`` terms (and the ``digamma`` of their gradient) have the shape of
    ``broadcast(theta, x)``, e.g. ``(B, G)``, even when ``logits`` carries particle
    dimensions ``(P, B, G)``; the first line is the per-draw part, computed as
    ``x * l - (theta + x) * softplus(l)`` (one transcendental instead of two
    ``logsigmoid``, no negation pass). The values are Pyro's to float rounding
    (``tests/test_train_speed.py``); sampling and moments are inherited.

    Args:
        total_count: ``theta > 0``, any shape broadcastable with ``logits``.
        logits: log-odds, ``log(mean / theta)``.
    """

    def __init__(self, total_count: torch.Tensor, logits: torch.Tensor, validate_args=None) -> None:
        total_count = torch.as_tensor(total_count, dtype=logits.dtype, device=logits.device)
        super().__init__(total_count=total_count, logits=logits, validate_args=validate_args)
        self.compact_total_count = total_count

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomialCounts, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.compact_total_count = self.compact_total_count
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta = self.compact_total_count
        theta_plus_x = theta + value  # shape of broadcast(theta, x): no particle dims
        log_coefficient = torch.lgamma(theta_plus_x) - torch.lgamma(1.0 + value) - torch.lgamma(theta)
        # theta = x = 0 has probability 1 (lgamma(0) is infinite): Pyro's convention
        log_coefficient = log_coefficient.masked_fill(theta_plus_x == 0.0, 0.0)
        logits = self.logits
        # logsigmoid(-l) = -softplus(l); addcmul fuses the product and the difference
        if torch.is_grad_enabled():
            per_draw = torch.addcmul(value * logits, theta_plus_x, F.softplus(logits), value=-1.0)
            return per_draw + log_coefficient
        # evaluation (IWELBO, validation loss): the same in place, two fewer full-size
        # allocations (~10% of a held-out IWELBO)
        out = value * logits
        out.addcmul_(theta_plus_x, F.softplus(logits), value=-1.0)
        return out.add_(log_coefficient)


class PoissonCounts(dist.Poisson):
    """Pyro's ``Poisson(rate)`` whose ``log_prob`` computes ``lgamma(x + 1)`` at the
    counts' shape (once per cell and gene), not once per particle of ``rate``."""

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PoissonCounts, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self.is_sparse:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        return value.xlogy(self.rate) - self.rate - torch.lgamma(value + 1.0)


class ZeroInflatedNegativeBinomialCounts(dist.ZeroInflatedDistribution):
    """``pi * delta_0 + (1 - pi) * NB``: Pyro's zero-inflated distribution around a
    :class:`NegativeBinomialCounts` (its cheaper ``log_prob``), with ``pi = sigmoid(gate_logits)``::

        log p(0) = log(pi + (1 - pi) NB(0)),   log p(x > 0) = log(1 - pi) + log NB(x)

    computed from the logits (softplus form, finite for any gate). Mean ``(1 - pi) mu``.

    Args:
        total_count: ``theta > 0`` of the NB (e.g. ``(G,)``).
        logits: NB log-odds ``log(mu / theta)``, ``(..., B, G)``.
        gate_logits: ``logit(pi)``, broadcastable with ``logits``.
    """

    def __init__(self, total_count: torch.Tensor, logits: torch.Tensor, gate_logits: torch.Tensor, validate_args=None) -> None:
        base = NegativeBinomialCounts(total_count, logits=logits, validate_args=validate_args)
        super().__init__(base, gate_logits=gate_logits, validate_args=validate_args)

    @property
    def total_count(self) -> torch.Tensor:
        return self.base_dist.total_count

    @property
    def logits(self) -> torch.Tensor:
        return self.base_dist.logits


class CountLikelihood(PyroModule):
    """Observation model of a ``(B, G)`` matrix of counts given gene logits.

    Args:
        n_genes: G.
        kind: ``"nb"`` (default, per-gene inverse dispersion ``theta = exp(log_theta)``),
            ``"zinb"`` (the NB with zero inflation: every call then needs
            ``zero_logits``), ``"poisson"``, or ``"gaussian"`` (on ``log1p(1e4 * x / l)``,
            per-gene scale; the decoder output is then the mean of that, not a logit).

        n_groups: 1 (default): one dispersion (scale) per gene, ``log_theta`` ``(G,)``;
            more: one per group and gene, ``(n_groups, G)`` (scVI's gene-batch
            dispersion), and every call then passes each cell's group code (``groups``).
    """

    def __init__(self, n_genes: int, kind: str = "nb", n_groups: int = 1) -> None:
        super().__init__()
        if kind not in COUNT_LIKELIHOODS:
            raise ValueError(f"unknown likelihood {kind!r}; expected one of {COUNT_LIKELIHOODS}")
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.kind = kind
        self.n_groups = int(n_groups)
        if kind in ("nb", "zinb", "gaussian"):
            # theta starts at e^2 ~ 7: moderate overdispersion, typical of UMI data
            init = 0.0 if kind == "gaussian" else 2.0
            shape = (n_genes,) if n_groups == 1 else (n_groups, n_genes)
            self.log_theta = nn.Parameter(torch.full(shape, init))

    @property
    def theta(self) -> torch.Tensor:
        return self.log_theta.exp()

    def _log_theta(self, groups: torch.Tensor | None) -> torch.Tensor:
        """``(G,)``, or ``(B, G)`` rows of each cell's group."""
        if self.n_groups == 1:
            return self.log_theta
        if groups is None:
            raise ValueError(f"this likelihood has {self.n_groups} dispersion groups: pass each cell's group code (groups)")
        return self.log_theta[groups]

    def _check_zero_logits(self, zero_logits: torch.Tensor | None) -> None:
        if (zero_logits is None) != (self.kind != "zinb"):
            raise ValueError(
                "the 'zinb' likelihood needs zero-inflation logits (zero_logits, (..., B, G)) from the decoder"
                if zero_logits is None else f"zero_logits are for the 'zinb' likelihood, not {self.kind!r}"
            )

    def distribution(
        self,
        gene_logits: torch.Tensor,
        library: torch.Tensor,
        zero_logits: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> dist.TorchDistribution:
        """The ``(…, B)``-batched distribution over ``(G,)`` count vectors.

        gene_logits: ``(..., B, G)``; library: ``(B,)`` (or ``(..., B)``, e.g. a latent
        library with particle dimensions); zero_logits: ``(..., B, G)``, ``"zinb"`` only;
        groups: ``(B,)`` dispersion group codes (with ``n_groups > 1`` only).
        """
        self._check_zero_logits(zero_logits)
        if self.kind == "gaussian":
            return dist.Normal(gene_logits, self._log_theta(groups).exp()).to_event(1)
        log_library = library.log().unsqueeze(-1)
        if self.kind == "poisson":
            return PoissonCounts((log_library + torch.log_softmax(gene_logits, dim=-1)).exp()).to_event(1)
        # log_softmax + (log l - log theta): one full-size (particles x cells x genes) add,
        # and no full-size negation in the backward pass, instead of an add and a subtract
        log_theta = self._log_theta(groups)
        logits = torch.log_softmax(gene_logits, dim=-1)
        offset = log_library - log_theta
        if torch.is_grad_enabled() or torch.broadcast_shapes(logits.shape, offset.shape) != logits.shape:
            logits = logits + offset
        else:  # in place when no backward pass needs log_softmax's output
            logits.add_(offset)
        if self.kind == "zinb":
            return ZeroInflatedNegativeBinomialCounts(log_theta.exp(), logits, zero_logits).to_event(1)
        return NegativeBinomialCounts(log_theta.exp(), logits=logits).to_event(1)

    def transform_observation(self, x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """What the likelihood scores: counts, or log-normalised expression (Gaussian)."""
        if self.kind == "gaussian":
            return log1p_normalize(x, library)
        return x

    def observe(
        self,
        name: str,
        gene_logits: torch.Tensor,
        x: torch.Tensor | None,
        library: torch.Tensor,
        zero_logits: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ):
        """``pyro.sample(name, ..., obs=x)``; call inside the ``"cells"`` plate.

        With ``x=None`` (posterior predictive) the site is sampled instead. The optional
        arguments are :meth:`distribution`'s.
        """
        obs = None if x is None else self.transform_observation(x, library)
        return pyro.sample(name, self.distribution(gene_logits, library, zero_logits, groups), obs=obs)

    def mean(self, gene_logits: torch.Tensor, library: torch.Tensor, zero_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Expected counts ``(..., B, G)`` (Gaussian: expected log-normalised values;
        zinb: ``(1 - pi) * l * softmax(f)``)."""
        self._check_zero_logits(zero_logits)
        if self.kind == "gaussian":
            return gene_logits
        mean = library.unsqueeze(-1) * torch.softmax(gene_logits, dim=-1)
        if self.kind == "zinb":
            mean = mean * torch.sigmoid(-zero_logits)
        return mean


class LibraryPrior(nn.Module):
    """scVI's prior of a latent log library size, one Normal per batch category:
    ``log l_i ~ Normal(loc[b_i], scale[b_i])`` with the mean and standard deviation of
    ``log(total counts)`` over the training cells of each category (buffers: saved with
    the weights; :meth:`set_from_data` fills them).

    Args:
        n_batches: number of categories (1: one prior for all cells).
    """

    def __init__(self, n_batches: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(n_batches))
        self.register_buffer("scale", torch.ones(n_batches))

    @torch.no_grad()
    def set_from_data(self, library: np.ndarray, codes: np.ndarray | None = None) -> None:
        """Fill ``loc`` / ``scale`` from training cells' library sizes ``(N,)`` and batch
        codes ``(N,)`` (None: one category). A category without cells keeps the pooled
        statistics; a scale is floored at 1e-2 (one cell, or equal libraries)."""
        log_library = np.log(np.maximum(np.asarray(library, dtype=np.float64), 1.0))
        codes = np.zeros(len(log_library), dtype=np.int64) if codes is None else np.asarray(codes, dtype=np.int64)
        if codes.shape != log_library.shape:
            raise ValueError(f"library of shape {log_library.shape} and batch codes of shape {codes.shape} differ")
        if len(log_library) == 0:
            raise ValueError("LibraryPrior.set_from_data needs at least one cell")
        if codes.min() < 0 or codes.max() >= len(self.loc):
            raise ValueError(f"batch codes must lie in [0, {len(self.loc)}), got [{codes.min()}, {codes.max()}]")
        pooled = (log_library.mean(), log_library.std())
        for b in range(len(self.loc)):
            values = log_library[codes == b]
            loc, scale = (values.mean(), values.std()) if len(values) else pooled
            self.loc[b] = float(loc)
            self.scale[b] = max(float(scale), 1e-2)

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` ``(B,)`` of cells with batch ``codes`` ``(B,)``."""
        return self.loc[codes], self.scale[codes]
