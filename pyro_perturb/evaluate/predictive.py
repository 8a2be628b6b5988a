"""Model effects by posterior predictive under intervention.

For each of ``num_particles`` particles the global latents are drawn from the guide, the
basal state from the prior (the guide samples no local site when ``batch.x is None``)
and the dosage is set with :func:`pyro.poutine.do` to the treatment's (0 for the
control). The model is run down to its count site ``"x"``, whose distribution is
captured instead of sampled (:class:`CountSite`): per particle and request row, the
expected counts ``l * softmax(f(z))`` and the dispersion. From it, per particle and row:

* the statistic of the data ATE, ``log2(1 + 1e4 x_g / T)`` (``T`` the cell's total),
  either **integrated** over the count noise
  (:func:`~pyro_perturb.evaluate.expected_lognorm.expected_log_normalized`: exact up to
  a quadrature tolerance of :data:`INTEGRATION_TOL`, so the particles only average over latents) or
  **sampled** (one draw of counts per particle, the exact reference);
* the decoder's normalised mean ``1e4 * mean_g / sum(mean) = 1e4 * rho_g`` (no count
  noise), for the pseudobulk log fold change.

Their means over particles make an :class:`EffectPrediction` (:func:`model_effects`);
:func:`model_ate` returns its ATE, the label's mean statistic minus the control's.
:func:`sample_cells` draws counterfactual cells (counts) the same way.

Depth: a number gives every drawn cell that library size (the model runs at it); a
mapping ``{label: observed library sizes}`` gives each particle of a row a library drawn
from that row's pool. The model then runs at :data:`~pyro_perturb.normalize.LIBRARY` and
the expected counts are rescaled, ``mean * l / 1e4``, exact because every count
likelihood of the zoo has mean ``library * softmax(f(z))`` and nothing else in a model
sees the library.

Combinations are first-class: the ATE of ``"A+B"`` is available whenever A and B are in
the vocabulary, because the dosage of ``"A+B"`` is ``d_A + d_B``. Each request row draws
its local sites from its own random stream
(:class:`~pyro_perturb.evaluate.streams.RowStreams`), and the treatment batch is sized
to a working-memory budget (:func:`~pyro_perturb.evaluate.ate_memory.ate_batch_for_memory`).
"""

from __future__ import annotations

import math
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.messenger import Messenger

from .. import contract
from ..data import Batch
from ..normalize import LIBRARY
from .ate_memory import DEFAULT_MEMORY_MB, ate_batch_for_memory, guide_hidden_width, widest_layer
from .expected_lognorm import expected_log_normalized
from .groups import _cov_codes
from .streams import RowStream, RowStreams, particle_plate, row_seed, seed_int

__all__ = [
    "DEFAULT_INTEGRATED_PARTICLES",
    "DEFAULT_PARTICLES",
    "DEFAULT_PARTICLE_BATCH",
    "ESTIMATORS",
    "ControlCells",
    "CountSite",
    "EffectPrediction",
    "describe_library",
    "model_ate",
    "model_effects",
    "default_particles",
    "sample_cells",
]

#: the paper's particle count for the model ATE, the sampled estimator's default
DEFAULT_PARTICLES = 2500
#: the integrated estimator's default: its seed-to-seed SD per particle is 10-14x smaller
#: than the sampled one's, so 250 particles are ~10x more precise than the paper's 2,500
#: sampled ones, in a tenth of the time (bench/results/ate_estimators.md)
DEFAULT_INTEGRATED_PARTICLES = 250
#: default particles per random block (see :func:`model_effects`)
DEFAULT_PARTICLE_BATCH = 100
#: ways to compute the statistic of a particle (see :func:`model_effects`)
ESTIMATORS = ("integrated", "sampled")

_LN2 = math.log(2.0)
#: absolute error bound (log2 units) of the integrated estimator per particle and gene: far
#: below the Monte Carlo error of any ATE, ~1.5x faster than 1e-6 (bench/results/expected_lognorm.md)
INTEGRATION_TOL = 1e-4
#: cells x genes per quadrature chunk when every row of a step is integrated at once
#: (six float32 buffers of it: 96 MB)
_ROWS_AT_ONCE_CHUNK = 1 << 22

#: a library size for every cell (a number), or a pool of observed sizes per label
Library = float | Mapping[str, np.ndarray]


@dataclass
class EffectPrediction:
    """What :func:`model_effects` predicts (labels x genes DataFrames, index
    ``"perturbation"``, columns the genes).

    Attributes:
        ate: requested labels x genes: mean ``log2(1 + 1e4 x / T)`` of the label minus
            the control's (``T`` the cell's total count).
        lognorm_mean: rows ``[control] + labels`` (each once): the mean of that statistic.
        normalized_mean: the same rows: mean over particles of ``1e4 * mean_g / sum(mean)``
            (``1e4 * rho_g``) from the decoder's expected counts, without count noise; for
            the pseudobulk log fold change.
        library: ``"fixed 10000"`` or ``"observed (pools: ...)"``: the depth of the drawn cells.
        estimator: ``"integrated"`` or ``"sampled"``.
        num_particles: posterior predictive particles.
        basal: ``"prior"`` or ``"control cells (n)"``: where the basal states came from.
    """

    ate: pd.DataFrame
    lognorm_mean: pd.DataFrame
    normalized_mean: pd.DataFrame
    library: str
    estimator: str
    num_particles: int
    basal: str = "prior"


class _DosageSite:
    """The model with its dosage as a sample site ``"d"`` that ``poutine.do`` can set;
    its local sites are drawn by ``streams`` and its count site captured by ``counts``."""

    def __init__(self, model, streams: RowStreams, counts: "CountSite", basal: "_BasalDraws | None" = None) -> None:
        self.model = model
        self.streams = streams
        self.counts = counts
        self.basal = basal

    def __call__(self, batch: Batch):
        d = pyro.sample("d", dist.Delta(batch.d, event_dim=2))
        # the basal messenger is entered last, so it sets its sites before the streams draw
        with self.streams, self.counts, (self.basal if self.basal is not None else contextlib.nullcontext()):
            return self.model(replace(batch, d=d), observe=False)


@dataclass(frozen=True)
class ControlCells:
    """Observed control cells whose posterior basal states replace the prior's
    (``model_effects(..., basal=ControlCells(data, indices))``): "abduction".

    Each particle takes one of these cells (drawn with replacement, seeded per particle
    block), draws the model's dosage-independent local sites
    (:func:`pyro_perturb.contract.basal_sites`: SAMS-VAE's ``z_basal``, the conditional
    VAE's ``z``) from the guide given the cell's counts, and decodes them under every
    requested dosage: the same cell's counterfactual under each treatment and under the
    control. The population of basal states is then the data's (the training controls'),
    not the prior's, which a trained VAE matches only approximately.

    Attributes:
        data: the encoded data (:class:`~pyro_perturb.data.PerturbationData`).
        indices: control cells to draw from (use training cells only when the result is
            compared with held-out cells).
    """

    data: object
    indices: np.ndarray

    def __post_init__(self) -> None:
        if len(self.indices) == 0:
            raise ValueError("ControlCells needs at least one cell")


class _BasalDraws(Messenger):
    """Sets the model's basal sites to ``values[site]`` (``(particles, L)``), the same for
    every request row, under ``Predictive``'s particle plate; leaves the shape probes alone."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg) -> None:
        if msg["name"] not in self.values or msg["is_observed"] or msg["value"] is not None:
            return
        plate = particle_plate()
        if plate is None:
            return
        fn = msg["fn"]
        value = self.values[msg["name"]]  # (particles, L)
        # the particle plate is outside the model: broadcast the site to it (particles, rows)
        batch_shape = torch.broadcast_shapes(fn.batch_shape, (plate.size,) + (1,) * (-plate.dim - 1))
        shape = batch_shape + fn.event_shape
        view = value.reshape(value.shape[:1] + (1,) * (len(shape) - value.dim()) + value.shape[1:])
        msg["value"] = view.expand(shape).to(dtype=fn.mean.dtype)


def _basal_values(guide, model, cells: ControlCells, block_seed: np.random.SeedSequence, k: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Posterior draws ``{site: (k, L)}`` of the basal sites for ``k`` control cells drawn
    with replacement (seeded), from the guide given each cell's counts and dosage."""
    sites = contract.basal_sites(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} declares no basal sites (contract.basal_sites): its local latents "
            "depend on the treatment, so they cannot be taken from control cells; use basal='prior'"
        )
    rng = np.random.default_rng(block_seed)
    picked = np.asarray(cells.indices)[rng.integers(0, len(cells.indices), size=k)]
    order = np.argsort(picked, kind="stable")
    batch = cells.data.batch(picked[order], device=device)
    torch.manual_seed(seed_int(block_seed))
    trace = poutine.trace(guide).get_trace(batch)
    back = torch.as_tensor(np.argsort(order, kind="stable"), device=device)
    out = {}
    for name in sites:
        if name not in trace.nodes:
            raise ValueError(f"the guide samples no basal site {name!r} for observed cells")
        out[name] = trace.nodes[name]["value"].detach()[back]
    return out


class CountSite(Messenger):
    """Captures the distribution of the count site ``"x"`` instead of sampling it.

    Entered inside the model (below ``Predictive``'s particle plate), it keeps the
    site's distribution broadcast to ``(particles, rows)`` and gives the site zeros (an
    expanded view: no memory). ``Predictive``'s shape probes (without the particle
    plate) get zeros too. After the run, the ``*_row`` methods read it: of row ``r``,
    ``(particles, G)`` tensors (``libraries``: ``(particles,)``); of every row at once
    (``r=None``), ``(particles, rows, G)`` tensors (``libraries``: ``(particles, rows)``).

    Families: the negative binomial (``mean = total_count * exp(logits)``), the Poisson
    and the Normal of the Gaussian likelihood, which models ``y = log1p(1e4 x / l)``
    itself: its ``log2(1 + 1e4 x / T)`` is ``y / ln 2``, whatever the library.

    Args:
        reference: the library size the model is run at (the requests' library).
    """

    def __init__(self, reference: float) -> None:
        super().__init__()
        self.reference = float(reference)
        self.kind: str | None = None
        self._params: tuple[torch.Tensor, ...] = ()
        self._theta: torch.Tensor | None = None
        #: options of :func:`expected_log_normalized` (e.g. ``chunk_elements``)
        self.quadrature: dict = {}

    def _pyro_sample(self, msg) -> None:
        if msg["name"] != "x" or msg["is_observed"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        plate = particle_plate()
        if plate is None:  # a shape probe
            msg["value"] = _zeros_like_sample(fn)
            return
        batch_shape = torch.broadcast_shapes(fn.batch_shape, (plate.size,) + (1,) * (-plate.dim - 1))
        if len(batch_shape) != 2:
            raise ValueError(f"the count site 'x' has batch shape {tuple(batch_shape)}; expected (particles, rows)")
        fn = fn.expand(batch_shape)
        self._capture(fn)
        msg["value"] = _zeros_like_sample(fn)

    def _capture(self, fn) -> None:
        base = fn
        while isinstance(base, dist.Independent):
            base = base.base_dist
        if isinstance(base, dist.ZeroInflatedDistribution) and isinstance(base.base_dist, torch.distributions.NegativeBinomial):
            # scVI's zinb: the NB's parameters and the zero-inflation logits
            self.kind = "zinb"
            nb = base.base_dist
            self._params = (nb.logits, nb.total_count, base.gate_logits)
            self._theta = None
        elif isinstance(base, torch.distributions.NegativeBinomial):
            self.kind = "nb"
            self._params = (base.logits, base.total_count)
            compact = getattr(base, "compact_total_count", None)
            self._theta = compact if compact is not None and compact.dim() <= 1 else None
        elif isinstance(base, torch.distributions.Poisson):
            self.kind = "poisson"
            self._params = (base.rate,)
        elif isinstance(base, torch.distributions.Normal):
            self.kind = "gaussian"
            self._params = (base.loc, base.scale)
        elif callable(getattr(base, "predictive_normal", None)):
            # a distribution of log-normalised expression without closed-form moments
            # (NODAGS-Flow's SEM): one draw per particle, as a Normal of ~zero width, so
            # that the particles carry its noise
            normal = base.predictive_normal()
            self.kind = "gaussian"
            self._params = (normal.loc, normal.scale)
        else:
            raise ValueError(
                f"the model's count site 'x' is a {type(base).__name__}: the model effects need a "
                "negative binomial (zero-inflated or not), Poisson or Gaussian likelihood"
            )

    def mean_row(self, r: int | None, libraries: torch.Tensor | None = None) -> torch.Tensor:
        """Expected counts of row ``r`` at ``libraries`` (``(particles,)``; None: the
        reference library)."""
        if self.kind in ("nb", "zinb"):
            logits, total_count = self._row(r)[:2]
            shifted = self._logits_at(logits, libraries)
            mean = (shifted.exp_() if libraries is not None else shifted.exp()).mul_(total_count)
            # zinb: (1 - pi) mu
            return mean.mul_(torch.sigmoid(-self._row(r)[2])) if self.kind == "zinb" else mean
        if self.kind == "poisson":
            (rate,) = self._row(r)
            return rate.clone() if libraries is None else rate * (libraries / self.reference).unsqueeze(-1)
        raise ValueError("the Gaussian likelihood models log-normalised expression, not counts")

    def sample_row(self, r: int, libraries: torch.Tensor | None, stream: RowStream) -> torch.Tensor:
        """Counts of row ``r`` drawn with ``stream`` (exact Gamma-Poisson / Poisson)."""
        if self.kind in ("nb", "zinb"):
            logits, total_count = self._row(r)[:2]
            x = stream.negative_binomial(total_count, self._logits_at(logits, libraries))
            if self.kind == "zinb":  # an extra zero with probability pi = sigmoid(gate logits)
                gate = torch.sigmoid(self._row(r)[2])
                x = x.masked_fill_(torch.rand(x.shape, generator=stream.gen, dtype=x.dtype, device=x.device) < gate, 0.0)
            return x
        if self.kind == "poisson":
            return stream.poisson(self.mean_row(r, libraries))
        raise ValueError(
            "the Gaussian likelihood models log-normalised expression, not counts: drawing cells "
            "needs a count likelihood (nb or poisson)"
        )

    def lognorm_row(self, r: int | None, libraries: torch.Tensor | None, stream: RowStream | None, estimator: str) -> torch.Tensor:
        """``log2(1 + 1e4 x / T)`` of row ``r``: its expectation over the count noise
        (``"integrated"``; every row at once with ``r=None``) or its value at one draw of
        counts with the row's ``stream`` (``"sampled"``)."""
        if self.kind == "gaussian":
            loc, scale = self._row(r)
            if estimator == "sampled":
                loc = loc + scale * torch.randn(loc.shape, generator=stream.gen, dtype=loc.dtype, device=loc.device)
            return loc / _LN2
        if estimator == "integrated":
            if self.kind == "zinb":
                raise ValueError("the integrated estimator integrates NB or Poisson counts: a zero-inflated NB "
                                 "(likelihood 'zinb') needs the sampled estimator (estimator='sampled')")
            theta = None
            if self.kind == "nb":
                theta = self._theta if self._theta is not None else self._row(r)[1]
            return expected_log_normalized(self.mean_row(r, libraries), theta, scale=LIBRARY, tol=INTEGRATION_TOL,
                                           **self.quadrature)
        x = self.sample_row(r, libraries, stream)
        # normalise to 1e4 by each draw's own total, in place
        total = x.sum(-1, keepdim=True).clamp_min_(1.0)
        return x.mul_(LIBRARY / total).add_(1.0).log2_()

    def normalized_row(self, r: int | None) -> torch.Tensor:
        """``E[1e4 x_g / T]`` without count noise: ``1e4 * mean_g / sum(mean)`` for counts;
        ``E[expm1(y)] = exp(loc + scale^2 / 2) - 1`` for the Gaussian."""
        if self.kind == "gaussian":
            loc, scale = self._row(r)
            return torch.expm1(loc + 0.5 * scale.square())
        mean = self.mean_row(r)
        return mean.mul_(LIBRARY / mean.sum(-1, keepdim=True).clamp_min_(torch.finfo(mean.dtype).tiny))

    def _row(self, r: int | None) -> tuple[torch.Tensor, ...]:
        if self.kind is None:
            raise RuntimeError("no count site was captured (the model has no sample site 'x')")
        return self._params if r is None else tuple(p.select(1, r) for p in self._params)

    def _logits_at(self, logits: torch.Tensor, libraries: torch.Tensor | None) -> torch.Tensor:
        """NB logits at other libraries (``mean`` scales with the library, and ``logits =
        log(mean / theta)``): a new tensor; with None, the site's own (not to be changed)."""
        if libraries is None:
            return logits
        return logits + (libraries / self.reference).log().unsqueeze(-1).to(logits.dtype)


def _zeros_like_sample(fn) -> torch.Tensor:
    """Zeros of a sample's shape: an expanded view of one element (no memory)."""
    base = fn
    while isinstance(base, dist.Independent):
        base = base.base_dist
    param = next((v for v in vars(base).values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    like = param if param is not None else torch.zeros(())
    return like.new_zeros(()).expand(fn.batch_shape + fn.event_shape)


def describe_library(library: Library) -> str:
    """``"fixed 10000"`` or ``"observed (pools: ...)"``, and checks the value: a
    positive number, or a mapping of non-empty 1-D arrays of positive sizes."""
    if isinstance(library, Mapping):
        if not library:
            raise ValueError("library: the mapping of library-size pools is empty")
        sizes = []
        for label, pool in library.items():
            pool = np.asarray(pool, dtype=np.float64)
            if pool.ndim != 1 or pool.size == 0 or not np.isfinite(pool).all() or (pool <= 0).any():
                raise ValueError(f"library[{label!r}] must be a non-empty 1-D array of positive library sizes")
            sizes.append(pool)
        counts = [len(p) for p in sizes]
        median = float(np.median(np.concatenate(sizes)))
        return (f"observed (pools: {len(sizes)} rows, {min(counts)}-{max(counts)} sizes each, "
                f"median library {median:.0f})")
    try:
        value = float(library)
    except (TypeError, ValueError):
        raise ValueError(f"library must be a number or a mapping of label -> library sizes, got {library!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"library must be a positive number, got {library!r}")
    return f"fixed {value:g}"


def _row_pools(library: Library, rows: list[str]) -> list[np.ndarray] | None:
    """Sorted pool per row (None for a fixed library); a missing row -> ValueError."""
    if not isinstance(library, Mapping):
        return None
    missing = [lab for lab in rows if lab not in library]
    if missing:
        raise ValueError(
            f"library: no pool of library sizes for {', '.join(map(repr, missing[:5]))}"
            f"{' ...' if len(missing) > 5 else ''}; the mapping must hold every requested row, control included"
        )
    return [np.sort(np.asarray(library[lab], dtype=np.float64)) for lab in rows]


def _basal_option(basal) -> "ControlCells | None":
    if isinstance(basal, ControlCells):
        return basal
    if basal == "prior":
        return None
    raise ValueError(f"basal must be 'prior' or a ControlCells, got {basal!r}")


def default_particles(estimator: str) -> int:
    """The default particle count of an estimator (:data:`DEFAULT_PARTICLES` sampled,
    :data:`DEFAULT_INTEGRATED_PARTICLES` integrated)."""
    return DEFAULT_INTEGRATED_PARTICLES if estimator == "integrated" else DEFAULT_PARTICLES


def _check_options(num_particles: int, particle_batch: int, treatment_batch: int | None, estimator: str) -> None:
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    if particle_batch < 1:
        raise ValueError(f"particle_batch must be >= 1, got {particle_batch}")
    if treatment_batch is not None and treatment_batch < 1:
        raise ValueError(f"treatment_batch must be >= 1, got {treatment_batch}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")


# (index of the step's first row in the request, captured site, libraries (particles, rows)
# or None, the rows' streams, a function mapping f(r) over the step's rows in parallel)
StepFunction = Callable[[int, CountSite, "torch.Tensor | None", "list[RowStream]", Callable], None]


def _run_steps(
    model,
    guide,
    spec,
    rows: list[str],
    step_fn: StepFunction,
    *,
    num_particles: int,
    seed: int,
    device: torch.device,
    library: Library,
    covariate_codes,
    treatment_batch: int | None,
    particle_batch: int,
    memory_mb: float | None,
    num_threads: int | None,
    basal: "ControlCells | None" = None,
) -> None:
    """Run the intervened model over particle blocks x batches of request rows and call
    ``step_fn`` once per step (block x batch) with the captured count site.

    Random streams: the globals of block ``j`` come from torch's generator seeded by
    ``(seed, j)``; each request row's local draws (and its counts, in ``step_fn``) from
    its own stream seeded by ``(seed, j, label)``, except the basal (normal) noise,
    which every row of block ``j`` shares (common random numbers), and, with library
    pools, the quantile of each particle's library, also shared by the rows of a block:
    a row's library is the ``floor(u * n)``-th of its sorted pool of ``n``, with ``u``
    from ``(seed, j, 2)`` (the ATE then carries no noise from depth differences).
    """
    model.eval()
    guide.eval()
    G = spec.n_genes
    pools = _row_pools(library, rows)
    run_library = LIBRARY if pools is not None else float(library)
    threads = max(1, int(num_threads or torch.get_num_threads())) if device.type == "cpu" else 1
    particle_batch = min(int(particle_batch), num_particles)
    if treatment_batch is None or memory_mb is not None:
        budget_rows, particle_batch = ate_batch_for_memory(
            DEFAULT_MEMORY_MB if memory_mb is None else memory_mb, len(rows), particle_batch, G,
            contract.n_latent(model), spec.n_perturbations, threads,
            hidden=widest_layer(model, exclude=G), guide_hidden=guide_hidden_width(guide),
        )
        treatment_batch = budget_rows if treatment_batch is None else min(treatment_batch, budget_rows)
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    try:
        # argument validation of every distribution is a full pass over (particles, rows,
        # genes) tensors per site and cannot fail on the model's own parameters here
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), pyro.validation_enabled(False):
            for block, p0 in enumerate(range(0, num_particles, particle_batch)):
                k = min(particle_batch, num_particles - p0)
                torch.manual_seed(seed_int(np.random.SeedSequence([int(seed) % 2**63, block])))
                probe = spec.request_batch([rows[0]], run_library, covariate_codes, device=device)
                globals_ = Predictive(guide, num_samples=k, parallel=True, return_sites=None)(probe)
                basal_draws = None
                if basal is not None:
                    values = _basal_values(guide, model, basal, np.random.SeedSequence([int(seed) % 2**63, block, 3]), k, device)
                    basal_draws = _BasalDraws(values)
                quantile = None
                if pools is not None:
                    quantile = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, block, 2])).random(k)
                for start in range(0, len(rows), treatment_batch):
                    chunk = rows[start : start + treatment_batch]
                    batch = spec.request_batch(chunk, run_library, covariate_codes, device=device)
                    shared = np.random.SeedSequence([int(seed) % 2**63, block, 1])
                    streams = [RowStream(row_seed(seed, block, lab), device, shared) for lab in chunk]
                    site = CountSite(run_library)
                    # the model's own dosage is the control's; the intervention sets each row's
                    intervened = poutine.do(_DosageSite(model, RowStreams(streams, pool), site, basal_draws), data={"d": batch.d})
                    base = replace(batch, d=torch.zeros_like(batch.d))
                    Predictive(intervened, posterior_samples=globals_, num_samples=k, parallel=True, return_sites=("x",))(base)
                    libraries = None
                    if pools is not None:
                        picked = np.stack([p[np.minimum((quantile * len(p)).astype(np.int64), len(p) - 1)]
                                           for p in pools[start : start + len(chunk)]], axis=1)
                        libraries = torch.as_tensor(picked, dtype=torch.float32, device=device)

                    def for_each_row(fn: Callable[[int], None], n: int = len(chunk)) -> None:
                        if pool is None or n == 1:
                            for r in range(n):
                                fn(r)
                        else:
                            list(pool.map(fn, range(n)))

                    step_fn(start, site, libraries, streams, for_each_row)
                    del site
    finally:
        if pool is not None:
            pool.shutdown()


def _resolve(model, spec, labels, device, covariates):
    labels = list(labels)
    if device is None:
        device = next(iter(model.parameters()), torch.zeros(0)).device
    codes = None if covariates is None else _cov_codes(spec, covariates)
    return labels, torch.device(device), codes


@torch.no_grad()
def model_effects(
    model,
    guide,
    spec,
    labels: list[str],
    *,
    library: Library = LIBRARY,
    num_particles: int | None = None,
    seed: int = 0,
    estimator: str = "integrated",
    device: torch.device | str | None = None,
    memory_mb: float | None = None,
    covariates=None,
    treatment_batch: int | None = None,
    particle_batch: int = DEFAULT_PARTICLE_BATCH,
    num_threads: int | None = None,
    rows_at_once: bool | None = None,
    basal: "str | ControlCells" = "prior",
) -> EffectPrediction:
    """Model effects of ``labels`` (combinations included) by posterior predictive.

    The particles are split into blocks of ``particle_batch``. For each block the global
    latents are drawn once from the guide (``Predictive(guide)``) and shared by every
    treatment and the control (common random numbers); then for each batch of request
    rows (the control once, then the treatments; ``x = None``)
    ``Predictive(model, posterior_samples=globals)`` draws the basal state from the prior,
    with ``poutine.do`` setting the dosage site, down to the count site, whose
    distribution :class:`CountSite` captures. Per particle and row, the statistic
    ``log2(1 + 1e4 x / T)`` is integrated over the count noise or sampled
    (``estimator``) and summed over particles, as is the normalised mean.

    For a given ``seed``, ``num_particles`` and ``particle_batch``, a label's values do
    not depend on the treatment batching (``treatment_batch``, ``memory_mb``, threads) or
    on which other labels are asked: bit for bit with the sampled estimator; to float
    rounding (~1e-7) with the integrated one, because the decoder's multi-threaded float32
    products may round a row differently in another batch and the integrated value keeps
    that rounding (sampled counts are integers). The ATE of the control label is exactly
    0 (see :func:`_run_steps` for the random streams).

    Args:
        labels: perturbation labels (``"A"``, ``"A+B"``).
        library: a number: every drawn cell has that library size (the paper: 1e4); or a
            mapping ``{label: 1-D array of library sizes}`` holding every requested row,
            the control included: each particle of a row draws its library from that
            row's pool (a missing row raises ValueError).
        num_particles: posterior predictive particles; default
            :func:`default_particles` (2,500 sampled, the paper's; 250 integrated, ~10x
            more precise than that).
        seed: the random seed.
        estimator: ``"integrated"`` (default; the count noise integrated out, exact to
            :data:`INTEGRATION_TOL` (1e-4) per particle, so that fewer particles reach a given precision) or
            ``"sampled"`` (one draw of counts per particle). The Gaussian likelihood
            models ``log1p(1e4 x / l)`` itself: its statistic is that value over ln 2 (its
            mean, or a draw), and the library plays no part.
        device: default: the model's.
        memory_mb: working-memory budget (MB; default
            :data:`~pyro_perturb.evaluate.ate_memory.DEFAULT_MEMORY_MB` when
            ``treatment_batch`` is not given): peak memory above the process's before the
            call, estimated by :func:`~pyro_perturb.evaluate.ate_memory.ate_working_memory`
            (fitted to peak RSS, about 210 MB of it fixed); the largest treatment batch
            that fits is used. If one treatment of ``particle_batch`` particles does not
            fit, fewer particles per block are used (results then differ in Monte Carlo
            noise only); a budget below one row of one particle raises ValueError.
        covariates: covariate values of the drawn cells (``{key: value}``, a tuple in
            ``spec.covariate_keys`` order, or values joined with ``"|"``); default: the
            first category of each key.
        treatment_batch: request rows per step; default: the most that fit ``memory_mb``.
        particle_batch: particles per random block (and per step).
        num_threads: threads computing rows in parallel on CPU (default: torch's).
        rows_at_once: the integrated estimator computes every row of a step in one call
            (default on CUDA) instead of row by row (default on CPU, where the rows run
            in parallel threads and a label's values are bit-identical whatever the
            batching; at once, they agree to float rounding).
        basal: ``"prior"`` (the paper's: basal states from the model's prior) or
            :class:`ControlCells`: each particle's basal state is a control cell's
            posterior draw (its counterfactual under each dosage; models that declare
            :func:`~pyro_perturb.contract.basal_sites`).

    Returns:
        :class:`EffectPrediction`.
    """
    labels, device, codes = _resolve(model, spec, labels, device, covariates)
    if num_particles is None:
        num_particles = default_particles(estimator)
    _check_options(num_particles, particle_batch, treatment_batch, estimator)
    description = describe_library(library)
    G = spec.n_genes
    control = spec.control
    rows = [control] + list(dict.fromkeys(lab for lab in labels if lab != control))
    lognorm = torch.zeros((len(rows), G), dtype=torch.float64, device=device)
    normalized = torch.zeros((len(rows), G), dtype=torch.float64, device=device)

    if rows_at_once is None:
        rows_at_once = device.type == "cuda"

    def statistics(start: int, site: CountSite, libraries, streams: list[RowStream], for_each_row) -> None:
        if rows_at_once and estimator == "integrated":
            # every row of the step in one call (few large kernels: what a GPU wants)
            site.quadrature = {"chunk_elements": _ROWS_AT_ONCE_CHUNK}
            n = len(streams)
            lognorm[start : start + n] += site.lognorm_row(None, libraries, None, estimator).sum(0, dtype=torch.float64)
            normalized[start : start + n] += site.normalized_row(None).sum(0, dtype=torch.float64)
            return

        def one_row(r: int) -> None:
            row_libraries = None if libraries is None else libraries[:, r]
            lognorm[start + r] += site.lognorm_row(r, row_libraries, streams[r], estimator).sum(0, dtype=torch.float64)
            normalized[start + r] += site.normalized_row(r).sum(0, dtype=torch.float64)

        for_each_row(one_row)

    _run_steps(model, guide, spec, rows, statistics, num_particles=num_particles, seed=seed, device=device,
               library=library, covariate_codes=codes, treatment_batch=treatment_batch,
               particle_batch=particle_batch, memory_mb=memory_mb, num_threads=num_threads,
               basal=_basal_option(basal))
    index = pd.Index(rows, name="perturbation")
    lognorm_mean = pd.DataFrame((lognorm / num_particles).cpu().numpy(), index=index, columns=spec.genes)
    normalized_mean = pd.DataFrame((normalized / num_particles).cpu().numpy(), index=index, columns=spec.genes)
    means = lognorm_mean.to_numpy()
    position = {lab: i for i, lab in enumerate(rows)}
    treated = np.stack([means[position[lab]] for lab in labels]) if labels else np.zeros((0, G))
    ate = pd.DataFrame(treated - means[0], index=pd.Index(labels, name="perturbation"), columns=spec.genes)
    return EffectPrediction(ate=ate, lognorm_mean=lognorm_mean, normalized_mean=normalized_mean,
                            library=description, estimator=estimator, num_particles=int(num_particles),
                            basal="prior" if _basal_option(basal) is None else f"control cells ({len(basal.indices)})")


@torch.no_grad()
def model_ate(
    model,
    guide,
    spec,
    labels: list[str],
    num_particles: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    library: Library = LIBRARY,
    treatment_batch: int | None = None,
    particle_batch: int = DEFAULT_PARTICLE_BATCH,
    memory_mb: float | None = None,
    num_threads: int | None = None,
    *,
    estimator: str = "integrated",
    covariates=None,
) -> pd.DataFrame:
    """Model ATE of ``labels`` (labels x genes, log2(1 + normalised counts) units): the
    ``ate`` of :func:`model_effects` (same arguments)."""
    return model_effects(
        model, guide, spec, labels, library=library, num_particles=num_particles, seed=seed,
        estimator=estimator, device=device, memory_mb=memory_mb, covariates=covariates,
        treatment_batch=treatment_batch, particle_batch=particle_batch, num_threads=num_threads,
    ).ate


@torch.no_grad()
def sample_cells(
    model,
    guide,
    spec,
    labels: list[str],
    n_cells: int,
    *,
    library: Library = LIBRARY,
    seed: int = 0,
    device: torch.device | str | None = None,
    memory_mb: float | None = None,
    covariates=None,
    particle_batch: int = DEFAULT_PARTICLE_BATCH,
    num_threads: int | None = None,
    basal: "str | ControlCells" = "prior",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Counterfactual cells: ``n_cells`` posterior predictive draws of counts per label.

    Each cell is one particle of :func:`model_effects` (its own draw of the global
    latents, of the basal state from the prior, of its library from the label's pool
    or the fixed ``library``, and of counts with the label's own stream), so a label's
    cells are bit-identical whatever other labels are asked.

    Returns:
        ``{label: (counts (n_cells, G) float32 integers, libraries (n_cells,) float64)}``;
        each label once, in the order given. The Gaussian likelihood (no counts) raises
        ValueError.
    """
    labels, device, codes = _resolve(model, spec, labels, device, covariates)
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    _check_options(n_cells, particle_batch, None, "sampled")
    describe_library(library)
    rows = list(dict.fromkeys(labels))
    if not rows:
        return {}
    counts: list[list[np.ndarray]] = [[] for _ in rows]
    sizes: list[list[np.ndarray]] = [[] for _ in rows]

    def draw(start: int, site: CountSite, libraries, streams: list[RowStream], for_each_row) -> None:
        def one_row(r: int) -> None:
            row_libraries = None if libraries is None else libraries[:, r]
            x = site.sample_row(r, row_libraries, streams[r])
            counts[start + r].append(x.to(torch.float32).cpu().numpy())
            sizes[start + r].append(np.full(x.shape[0], site.reference) if row_libraries is None
                                    else row_libraries.double().cpu().numpy())

        for_each_row(one_row)

    _run_steps(model, guide, spec, rows, draw, num_particles=int(n_cells), seed=seed, device=device,
               library=library, covariate_codes=codes, treatment_batch=None, particle_batch=particle_batch,
               memory_mb=memory_mb, num_threads=num_threads, basal=_basal_option(basal))
    return {lab: (np.concatenate(counts[i]), np.concatenate(sizes[i])) for i, lab in enumerate(rows)}
