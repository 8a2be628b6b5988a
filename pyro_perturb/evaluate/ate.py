"""Average treatment effects (ATE): from data, and from a model by posterior predictive.

Definitions (docs/evaluation.md, "Average treatment effects"):

* **Data ATE** of label t: normalise each cell to 1e4 counts, ``log2(1 + x)``, take the
  mean over the cells of t minus the mean over control cells (:func:`data_ate`).
* **Model ATE**: a posterior predictive of that statistic under intervention. For each
  of ``num_particles`` particles the global latents are drawn from the guide, the basal
  state from the prior (the guide samples no local site when ``batch.x is None``), the
  dosage is set with :func:`pyro.poutine.do` to the treatment's (and to 0 for the
  control), the library is fixed at 1e4, counts are sampled, normalised the same way and
  averaged over particles (:func:`model_ate`). It runs as ``pyro.infer.Predictive``
  (vectorised over particles) on the model's device, in blocks of particles (globals drawn
  once per block, shared by every treatment and the control) and batches of treatments
  sized to a working-memory budget (:func:`ate_batch_for_memory`). It is seeded, and each
  treatment draws its counts from its own stream, so its ATE does not depend on the
  batching or on the other treatments asked (bench/ate_benchmark.py measures it).

Combinations are first-class: the ATE of ``"A+B"`` is available whenever A and B are in
the vocabulary, because the dosage of ``"A+B"`` is ``d_A + d_B``. A model that cannot
compose (``model.composes = False``, e.g. SVAE+, where each label is its own treatment)
gets ``NaN`` rows (``null`` in JSON) with a note for labels it has no training cells for.

Treatment splits for the metrics: a label is "train" if it has training cells, "test" if
its cells are all in the test split (held-out combinations); "all" is every non-control
label. The data ATE used for the metrics comes from held-out cells (val and test) by
default, so that "model ATE tracks data ATE" is measured on cells the model never saw.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.predictive import _predictive_vectorize_plate_name as _PARTICLE_PLATE
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK

from ..data import Batch, PerturbationData
from ..data.anndata import canonical_label
from .metrics import ate_metrics

__all__ = [
    "LIBRARY",
    "lognormalize",
    "data_ate",
    "treatment_splits",
    "model_ate",
    "representable_labels",
    "ate_results",
    "ate_evaluator",
    "ate_working_memory",
    "ate_batch_for_memory",
]

#: library size at which model counts are drawn, and to which every cell is normalised
LIBRARY = 1e4
#: the paper's particle count for the model ATE
DEFAULT_PARTICLES = 2500
ATE_SPLITS = ("all", "train", "test")


# ----------------------------------------------------------------------------- data ATE
def lognormalize(counts: torch.Tensor | np.ndarray, scale: float = LIBRARY):
    """``log2(1 + scale * x / sum_g x)`` per cell (last axis = genes)."""
    if isinstance(counts, np.ndarray):
        total = np.maximum(counts.sum(-1, keepdims=True), 1.0)
        return np.log2(1.0 + counts / total * scale)
    total = counts.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.log2(1.0 + counts / total * scale)


def _cells(data: PerturbationData, cells) -> np.ndarray:
    if isinstance(cells, str):
        if cells == "all":
            return np.arange(data.n_cells)
        if cells == "heldout":
            return np.flatnonzero(data.split != "train")
        return data.indices(cells)
    return np.asarray(cells)


def data_ate(data: PerturbationData, cells="heldout", min_cells: int = 1, chunk: int = 4096) -> tuple[pd.DataFrame, pd.Series]:
    """Data ATE of every non-control label with at least ``min_cells`` cells.

    Args:
        data: encoded data.
        cells: ``"heldout"`` (val and test cells; default), ``"all"``, a split name, or
            an array of cell indices. A label (or the control) with no cell there falls
            back to all its cells.
        min_cells: labels with fewer cells are left out.

    Returns:
        ``(ate, n_cells)``: a DataFrame (labels x genes) and the cells used per label.
    """
    idx = _cells(data, cells)
    labels_all = data.label_names()
    control = data.spec.control

    def means(index: np.ndarray) -> tuple[dict, dict]:
        sums, counts = {}, {}
        labs = labels_all[index]
        for start in range(0, len(index), chunk):
            sub, sub_labs = index[start : start + chunk], labs[start : start + chunk]
            ln = lognormalize(data.read_counts(sub).astype(np.float64))
            for lab in np.unique(sub_labs):
                rows = sub_labs == lab
                sums[lab] = sums.get(lab, 0.0) + ln[rows].sum(0)
                counts[lab] = counts.get(lab, 0) + int(rows.sum())
        return sums, counts

    sums, counts = means(idx)
    present = set(np.unique(labels_all))
    missing = sorted(present - set(counts))
    if missing:  # fall back to all cells of labels absent from the chosen cells
        extra = np.flatnonzero(np.isin(labels_all, missing))
        s2, c2 = means(extra)
        sums.update(s2)
        counts.update(c2)
    if control not in counts:
        raise ValueError(f"no control cells (label {control!r}) to compute the data ATE against")
    base = sums[control] / counts[control]
    order = [lab for lab in _label_order(data, counts) if lab != control and counts[lab] >= min_cells]
    ate = np.stack([sums[lab] / counts[lab] - base for lab in order]) if order else np.zeros((0, data.spec.n_genes))
    return (
        pd.DataFrame(ate, index=pd.Index(order, name="perturbation"), columns=data.spec.genes),
        pd.Series({lab: counts[lab] for lab in order}, name="n_cells"),
    )


def _label_order(data: PerturbationData, labels) -> list[str]:
    """Labels in vocabulary order (unknown ones after, sorted)."""
    labels = set(labels)
    known = [lab for lab in data.spec.labels if lab in labels]
    return known + sorted(labels - set(known))


def treatment_splits(data: PerturbationData) -> dict[str, str | None]:
    """``label -> "train" | "test" | None``: train if it has training cells, test if all
    its cells are test cells, None otherwise (e.g. only validation cells)."""
    labels = data.label_names()
    out: dict[str, str | None] = {}
    for lab in np.unique(labels):
        if lab == data.spec.control:
            continue
        splits = set(data.split[labels == lab].tolist())
        out[lab] = "train" if "train" in splits else ("test" if splits == {"test"} else None)
    return out


def representable_labels(model, data: PerturbationData, labels) -> tuple[list[str], dict[str, str]]:
    """Labels the model can predict, and a note for each one it cannot.

    A model that composes (``model.composes``, default True) predicts every label whose
    components are in its vocabulary. One that does not (each label its own treatment)
    predicts only labels it has training cells for.
    """
    notes: dict[str, str] = {}
    ok: list[str] = []
    composes = bool(getattr(model, "composes", True))
    train_labels = set(data.label_names(data.indices("train")).tolist())
    vocab = set(data.spec.perturbations)
    for lab in labels:
        parts = [] if lab == data.spec.control else lab.split(data.spec.separator)
        if any(p not in vocab for p in parts):
            notes[lab] = "a component is not in the model's perturbation vocabulary"
        elif not composes and lab not in train_labels:
            notes[lab] = (
                "this model encodes each label as its own treatment (one-hot) and cannot "
                "compose a label it has no training cells for"
            )
        else:
            ok.append(lab)
    return ok, notes


# ----------------------------------------------------------------------------- model ATE
class _DosageSite:
    """The model with its dosage as a sample site ``"d"`` that ``poutine.do`` can set;
    its local sites are drawn by ``streams`` (a :class:`_RowStreams`) when given."""

    def __init__(self, model, streams: "_RowStreams | None" = None) -> None:
        self.model = model
        self.streams = streams

    def __call__(self, batch: Batch):
        d = pyro.sample("d", dist.Delta(batch.d, event_dim=2))
        if self.streams is None:
            return self.model(replace(batch, d=d), observe=False)
        with self.streams:
            return self.model(replace(batch, d=d), observe=False)


def _row_seed(seed: int, block: int, label: str) -> np.random.SeedSequence:
    """The random stream of one request row (label) in one particle block.

    Keyed by the label's text, so a label's draws do not depend on which other labels
    are asked, in which order, or how they are batched."""
    words = np.frombuffer(hashlib.blake2b(label.encode(), digest_size=16).digest(), dtype=np.uint32)
    return np.random.SeedSequence([int(seed) % 2**63, int(block), *words.tolist()])


def _seed_int(seq: np.random.SeedSequence) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` from a seed sequence."""
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


class _RowStream:
    """One request row's random streams: ``torch.Generator``s on the run's device.
    Exact samplers: torch's own (the NegativeBinomial is torch's Gamma-Poisson mixture,
    drawn with this row's generator, seeded from a :func:`_row_seed` sequence).

    Normal (latent) sites are drawn as ``loc + scale * eps`` with ``eps`` from a
    generator seeded by ``shared`` (the particle block only), the same for every row:
    treatment and control rows then share their basal noise as well as their globals
    (common random numbers), which leaves each arm's expectation unchanged and removes
    the basal-state noise from their difference, the ATE."""

    def __init__(self, seq: np.random.SeedSequence, device: torch.device, shared: np.random.SeedSequence | None = None) -> None:
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(_seed_int(seq))
        self.latent_gen = self.gen
        if shared is not None:
            self.latent_gen = torch.Generator(device=device)
            self.latent_gen.manual_seed(_seed_int(shared))

    def normal(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return loc + scale * torch.randn(loc.shape, generator=self.latent_gen, dtype=loc.dtype, device=loc.device)

    def poisson(self, rate: torch.Tensor) -> torch.Tensor:
        return torch.poisson(rate, generator=self.gen)

    def negative_binomial(self, total_count: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``Poisson(Gamma(total_count, 1) * exp(logits))``, as torch's NegativeBinomial."""
        gamma = torch._standard_gamma(total_count.contiguous(), generator=self.gen)
        rate = gamma.clamp_min_(torch.finfo(gamma.dtype).tiny).mul_(logits.exp())
        return torch.poisson(rate, generator=self.gen)


class _RowStreams(Messenger):
    """Draws the local sites (those in the ``"cells"`` plate) of a posterior predictive
    row by row, each request row from its own :class:`_RowStream`.

    A row's values then depend only on its own stream, not on the rows batched with it,
    and rows can be drawn in parallel threads deterministically. Normal, negative
    binomial and Poisson sites are drawn this way (exact: the same Gamma-Poisson mixture
    as torch's ``NegativeBinomial``); a site of any other family is left to its own
    ``.sample()`` (torch's global generator).

    It runs inside the model (below ``Predictive``'s particle plate), so it adds the
    particle dimension itself. ``Predictive`` first runs the model twice without that
    plate, only to learn the sites' shapes: there the local sites get zeros (saving two
    draws of every count) and no stream is used.
    """

    def __init__(self, streams: list[_RowStream], pool: ThreadPoolExecutor | None) -> None:
        super().__init__()
        self.streams = streams
        self.pool = pool

    @staticmethod
    def _particle_plate():
        for frame in _PYRO_STACK:
            if getattr(frame, "name", None) == _PARTICLE_PLATE and hasattr(frame, "dim"):
                return frame
        return None

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        if not any(f.name == "cells" for f in msg["cond_indep_stack"]):
            return
        fn = msg["fn"]
        family = _family(fn)
        if family is None:
            return
        plate = self._particle_plate()
        if plate is None:  # a shape probe: the values are thrown away
            msg["value"] = family[1][0].new_zeros(fn.batch_shape + fn.event_shape)
            return
        batch_shape = torch.broadcast_shapes(fn.batch_shape, (plate.size,) + (1,) * (-plate.dim - 1))
        if len(batch_shape) == 0 or batch_shape[-1] != len(self.streams):
            return
        method, params = _family(fn.expand(batch_shape))
        row_dim = len(batch_shape) - 1
        shape = batch_shape + fn.event_shape
        params = [p.expand(shape) for p in params]
        out = torch.empty(shape, dtype=params[0].dtype, device=params[0].device)

        def draw(r: int) -> None:
            row = [p.select(row_dim, r) for p in params]
            out.select(row_dim, r).copy_(getattr(self.streams[r], method)(*row))

        if self.pool is None or len(self.streams) == 1:
            for r in range(len(self.streams)):
                draw(r)
        else:
            list(self.pool.map(draw, range(len(self.streams))))
        msg["value"] = out


def _family(fn) -> tuple[str, tuple[torch.Tensor, ...]] | None:
    """``(stream method, parameters)`` of a (possibly Independent) distribution that
    :class:`_RowStream` can draw, else None."""
    base = fn
    while isinstance(base, dist.Independent):
        base = base.base_dist
    if isinstance(base, torch.distributions.NegativeBinomial):
        return "negative_binomial", (base.total_count, base.logits)
    if isinstance(base, torch.distributions.Poisson):
        return "poisson", (base.rate,)
    if isinstance(base, torch.distributions.Normal):
        return "normal", (base.loc, base.scale)
    return None


# Working memory of the model ATE, in bytes (ate_working_memory): a fixed part (the first
# Predictive calls' allocator arenas, thread buffers and caches) plus, per particle of a
# step, the globals (the guide's E and M with its per-treatment hidden layer for the
# correlated SAMS-VAE guide; the model's E * M), and per particle and request row,
# gene-sized buffers (decoder output, log-softmax, NB logits, counts) and latent/hidden
# ones; per thread, one row's draw. Factors in float32 buffers, fitted to peak RSS
# (VmHWM minus RSS before the call) with bench/ate_benchmark.py at 200 and 700 treatments
# (1,187 genes, latent 100, hidden 400), where they over-estimate by up to 20%.
_FIXED_MB = 210.0
_GENE_BUFFERS = 2.5
_HIDDEN_BUFFERS = 2.0
_GLOBAL_BUFFERS = 4.0
_GUIDE_HIDDEN_BUFFERS = 2.25
_ROW_DRAW_BUFFERS = 5.0
# the factors were fitted at 200 treatments; at 700 x 2,500 the estimate came out 2% under
# the measured working peak (bench/results/ate_benchmark.md, row F): headroom on the part
# that grows with the batch
_HEADROOM = 1.15
#: the model ATE's default working-memory budget (MB) when none is given
DEFAULT_MEMORY_MB = 1024.0
#: default particles per random block (see :func:`model_ate`)
DEFAULT_PARTICLE_BATCH = 100


def ate_working_memory(
    n_rows: int,
    particles: int,
    n_genes: int,
    n_latent: int,
    n_treatments: int,
    n_threads: int = 1,
    hidden: int = 0,
    guide_hidden: int = 0,
) -> float:
    """Estimated peak working memory (bytes) of the model ATE run in steps of
    ``particles`` particles x ``n_rows`` request rows.

    ``hidden``: the model's widest hidden layer; ``guide_hidden``: the width of a guide
    network run once per treatment and particle (SAMS-VAE's correlated ``q(E | M)``)."""
    per_row = 4.0 * (_GENE_BUFFERS * n_genes + _HIDDEN_BUFFERS * (n_latent + hidden))
    per_particle = 4.0 * n_treatments * (_GLOBAL_BUFFERS * n_latent + _GUIDE_HIDDEN_BUFFERS * guide_hidden)
    per_particle += 4.0 * _ROW_DRAW_BUFFERS * n_genes * n_threads
    return _FIXED_MB * 2**20 + _HEADROOM * float(particles) * (n_rows * per_row + per_particle)


def ate_batch_for_memory(
    memory_mb: float,
    n_rows: int,
    particles: int,
    n_genes: int,
    n_latent: int,
    n_treatments: int,
    n_threads: int = 1,
    hidden: int = 0,
    guide_hidden: int = 0,
) -> tuple[int, int]:
    """``(treatment_rows, particles)`` per step whose working memory fits ``memory_mb``.

    The particle count is kept if one row of it fits (results then do not change) and
    the largest number of request rows, at most ``n_rows``, that fits is taken;
    otherwise the most particles for which one row fits, and as many rows as fit with
    them. Raises ValueError naming the minimum budget if one row of one particle does
    not fit.
    """
    budget = float(memory_mb) * 2**20

    def need(rows: int, parts: int) -> float:
        return ate_working_memory(rows, parts, n_genes, n_latent, n_treatments, n_threads, hidden, guide_hidden)

    if not budget > 0 or need(1, 1) > budget:
        raise ValueError(
            f"ATE memory budget of {memory_mb} MB is too small: one treatment row of one "
            f"particle needs {need(1, 1) / 2**20:.2f} MB ({n_genes} genes, {n_treatments} "
            f"treatments x {n_latent} latents); the budget must be at least {need(1, 1) / 2**20:.2f} MB"
        )
    particles = max(1, int(particles))
    if need(1, particles) > budget:
        particles = max(1, int((budget - need(1, 0)) // (need(1, 1) - need(1, 0))))
    lo, hi = 1, max(1, int(n_rows))  # the largest row count that fits (need grows with rows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid, particles) <= budget else (lo, mid - 1)
    return lo, particles


def _widest_layer(module, exclude: int = -1) -> int:
    """The largest ``out_features`` of the module's linear layers (except ``exclude``)."""
    widths = [m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear) and m.out_features != exclude]
    return max(widths, default=0)


def _guide_hidden(guide) -> int:
    """Width of a guide network run per treatment and particle (0 if none)."""
    encoder = getattr(guide, "effect_encoder", None)
    return _widest_layer(encoder) if encoder is not None else 0


@torch.no_grad()
def model_ate(
    model,
    guide,
    spec,
    labels: list[str],
    num_particles: int = DEFAULT_PARTICLES,
    seed: int = 0,
    device: torch.device | str | None = None,
    library: float = LIBRARY,
    treatment_batch: int | None = None,
    particle_batch: int = DEFAULT_PARTICLE_BATCH,
    memory_mb: float | None = None,
    num_threads: int | None = None,
    sampler: str = "rows",
) -> pd.DataFrame:
    """Model ATE of ``labels`` (combinations included) by posterior predictive.

    The particles are split into blocks of ``particle_batch``. For each block the global
    latents are drawn once from the guide (``Predictive(guide)``) and shared by every
    treatment and the control (common random numbers); then for each batch of request
    rows (the control once, then the treatments; ``x = None``, library ``library``)
    ``Predictive(model, posterior_samples=globals)`` draws the basal state from the prior
    and the counts, with ``poutine.do`` setting the dosage site. Counts are normalised
    to ``library`` (by their sampled total) and ``log2(1 + x)``, summed over particles.

    Random streams (``sampler="rows"``, the default): the globals of block ``j`` come
    from torch's generator seeded by ``(seed, j)``; each request row's local draws from
    its own stream seeded by ``(seed, j, label)``, except the basal (normal) noise, which
    every row of block ``j`` shares (common random numbers, see :class:`_RowStream`).
    For a given ``seed``,
    ``num_particles`` and ``particle_batch``, a label's ATE is therefore bit-identical
    whatever the treatment batching (``treatment_batch``, ``memory_mb``, threads) and
    whichever other labels are asked; the ATE of the control label is exactly 0.
    ``sampler="pyro"`` lets every site draw from torch's generator instead (the row
    values then depend on the batching; kept for comparison).

    Args:
        labels: perturbation labels (``"A"``, ``"A+B"``).
        num_particles: posterior predictive particles (paper: 2,500).
        seed: the random seed.
        device: default: the model's.
        library: library size of the drawn cells and of the normalisation.
        treatment_batch: request rows per step; default: the most that fit ``memory_mb``.
        particle_batch: particles per random block (and per step).
        memory_mb: working-memory budget (MB; default :data:`DEFAULT_MEMORY_MB` when
            ``treatment_batch`` is not given): peak memory above the process's before
            the call, estimated by :func:`ate_working_memory` (fitted to peak RSS, about
            210 MB of it fixed); the largest treatment batch that fits is used. If one
            treatment of ``particle_batch`` particles does not fit, fewer particles per
            block are used (results then differ in Monte Carlo noise only); a budget below
            one row of one particle raises ValueError.
        num_threads: threads drawing rows in parallel on CPU (default: torch's).
        sampler: ``"rows"`` or ``"pyro"`` (see above).

    Returns:
        DataFrame (labels x genes), the ATE in log2(1 + normalised counts) units.
    """
    labels = list(labels)
    if device is None:
        device = next(iter(model.parameters()), torch.zeros(0)).device
    device = torch.device(device)
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    if particle_batch < 1:
        raise ValueError(f"particle_batch must be >= 1, got {particle_batch}")
    if treatment_batch is not None and treatment_batch < 1:
        raise ValueError(f"treatment_batch must be >= 1, got {treatment_batch}")
    if sampler not in ("rows", "pyro"):
        raise ValueError(f"unknown sampler {sampler!r}; expected 'rows' or 'pyro'")
    model.eval()
    guide.eval()
    G = spec.n_genes
    control = spec.control
    rows = [control] + list(dict.fromkeys(lab for lab in labels if lab != control))
    threads = max(1, int(num_threads or torch.get_num_threads())) if device.type == "cpu" else 1
    particle_batch = min(int(particle_batch), num_particles)
    if treatment_batch is None or memory_mb is not None:
        budget_rows, particle_batch = ate_batch_for_memory(
            DEFAULT_MEMORY_MB if memory_mb is None else memory_mb, len(rows), particle_batch, G,
            int(getattr(model, "n_latent", 0) or 0), spec.n_perturbations, threads,
            hidden=_widest_layer(model, exclude=G), guide_hidden=_guide_hidden(guide),
        )
        treatment_batch = budget_rows if treatment_batch is None else min(treatment_batch, budget_rows)
    sums = torch.zeros((len(rows), G), dtype=torch.float64, device=device)
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 and sampler == "rows" else None
    try:
        # argument validation of every distribution is a full pass over (particles, rows,
        # genes) tensors per site and cannot fail on the model's own parameters here
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), pyro.validation_enabled(False):
            for block, p0 in enumerate(range(0, num_particles, particle_batch)):
                k = min(particle_batch, num_particles - p0)
                torch.manual_seed(_seed_int(np.random.SeedSequence([int(seed) % 2**63, block])))
                probe = spec.request_batch([control], library, device=device)
                globals_ = Predictive(guide, num_samples=k, parallel=True, return_sites=None)(probe)
                for start in range(0, len(rows), treatment_batch):
                    chunk = rows[start : start + treatment_batch]
                    batch = spec.request_batch(chunk, library, device=device)
                    streams = None
                    if sampler == "rows":
                        shared = np.random.SeedSequence([int(seed) % 2**63, block, 1])
                        streams = _RowStreams(
                            [_RowStream(_row_seed(seed, block, lab), device, shared) for lab in chunk], pool
                        )
                    # the model's own dosage is the control's; the intervention sets each row's
                    intervened = poutine.do(_DosageSite(model, streams), data={"d": batch.d})
                    base = replace(batch, d=torch.zeros_like(batch.d))
                    predictive = Predictive(intervened, posterior_samples=globals_, num_samples=k, parallel=True, return_sites=("x",))
                    x = predictive(base)["x"]
                    x = x.reshape(k, len(chunk), G)
                    # normalise to the library by each draw's own total, in place (float32)
                    total = x.sum(-1, keepdim=True).clamp_min_(1.0)
                    x.mul_(library / total).add_(1.0).log2_()
                    sums[start : start + len(chunk)] += x.sum(0, dtype=torch.float64)
                    del x
    finally:
        if pool is not None:
            pool.shutdown()
    if not labels:
        return pd.DataFrame(np.zeros((0, G)), columns=spec.genes)
    means = (sums / num_particles).cpu().numpy()
    position = {lab: i for i, lab in enumerate(rows)}
    treated = np.stack([means[position[lab]] for lab in labels])
    return pd.DataFrame(treated - means[0], index=pd.Index(labels, name="perturbation"), columns=spec.genes)


# ----------------------------------------------------------------------------- metrics
def _split_metrics(data_df: pd.DataFrame, model_df: pd.DataFrame, labels: list[str]) -> dict:
    rows = [lab for lab in labels if lab in data_df.index and lab in model_df.index and np.isfinite(model_df.loc[lab].to_numpy()).all()]
    out = {"ate_n_treatments": len(rows)}
    if not rows:
        out.update({k: None for k in ("ate_pearson", "ate_r2", "ate_pearson_top20", "ate_r2_top20")})
        return out
    out.update(ate_metrics(data_df.loc[rows].to_numpy(), model_df.loc[rows].to_numpy(), top_n=20))
    return out


def ate_results(
    model,
    guide,
    data: PerturbationData,
    num_particles: int = DEFAULT_PARTICLES,
    seed: int = 0,
    device=None,
    data_cells="heldout",
    memory_mb: float | None = None,
) -> dict:
    """Data ATE, model ATE and metrics per treatment split.

    Returns:
        dict with ``data`` and ``model`` (DataFrames; the model's has NaN rows for labels
        it cannot represent), ``splits`` (label -> split), ``metrics``
        (``{"all"|"train"|"test": {ate_pearson, ate_r2, ate_pearson_top20, ate_r2_top20,
        ate_n_treatments}}``), ``notes`` (label -> reason for a null), and, when the data
        carries a simulator's true ATE, ``true`` (DataFrame) and ``metrics_true``.
    """
    data_df, n_cells = data_ate(data, cells=data_cells)
    labels = list(data_df.index)
    truth = _true_ate(data)
    if truth is not None:  # also predict labels only the simulator knows (no cells here)
        for lab in truth.index:
            if lab not in labels:
                try:
                    data.spec.dosage_of(lab)
                except ValueError:
                    continue
                labels.append(lab)
    ok, notes = representable_labels(model, data, labels)
    pred = model_ate(model, guide, data.spec, ok, num_particles=num_particles, seed=seed, device=device, memory_mb=memory_mb)
    model_df = pred.reindex(labels)
    splits = treatment_splits(data)
    groups = {
        "all": list(data_df.index),
        "train": [lab for lab in data_df.index if splits.get(lab) == "train"],
        "test": [lab for lab in data_df.index if splits.get(lab) == "test"],
    }
    metrics = {s: _split_metrics(data_df, model_df, groups[s]) for s in ATE_SPLITS}
    for s in ATE_SPLITS:
        missing = [lab for lab in groups[s] if lab in notes]
        if missing:
            metrics[s]["ate_n_unrepresentable"] = len(missing)
    out = {
        "data": data_df,
        "model": model_df,
        "n_cells": n_cells,
        "splits": splits,
        "metrics": metrics,
        "notes": notes,
    }
    if truth is not None:
        truth = truth.loc[[lab for lab in truth.index if lab in model_df.index]]
        groups_t = {
            "all": list(truth.index),
            "train": [lab for lab in truth.index if splits.get(lab) == "train"],
            "test": [lab for lab in truth.index if splits.get(lab) == "test"],
        }
        out["true"] = truth
        out["metrics_true"] = {s: _split_metrics(truth, model_df, groups_t[s]) for s in ATE_SPLITS}
        out["metrics_data_vs_true"] = {s: _split_metrics(truth, data_df, groups_t[s]) for s in ATE_SPLITS}
    return out


def _true_ate(data: PerturbationData) -> pd.DataFrame | None:
    """The simulator's true ATE (``uns["ground_truth"]["ate"]``), if the data has one."""
    gt = getattr(data.adata, "uns", {}).get("ground_truth") if data.adata is not None else None
    if not isinstance(gt, dict) or "ate" not in gt or "ate_labels" not in gt:
        return None
    ate = np.asarray(gt["ate"], dtype=np.float64)
    if ate.ndim != 2 or ate.shape[1] != data.spec.n_genes:
        return None
    labels = [canonical_label(str(lab), data.spec.control, data.spec.separator) for lab in gt["ate_labels"]]
    return pd.DataFrame(ate, index=pd.Index(labels, name="perturbation"), columns=data.spec.genes)


# ----------------------------------------------------------------------------- evaluator
def ate_evaluator(
    run, data: PerturbationData, results: dict, out_dir: Path | None, seed: int, options: dict | None = None
) -> None:
    """``evaluate`` hook: ATE metrics per treatment split, CSVs, PPC export and plots.

    Adds ``results["ate"]`` = ``{"all"|"train"|"test": metrics, "notes": ...,
    "num_particles": ...}`` and copies the train / test treatment-split metrics into
    ``results["train"]`` / ``results["test"]``. Options (``evaluate_run(options=...)``):
    ``ate_particles`` (default 2500), ``ate_ppc`` (default True), ``ate_plots`` (default
    True), ``ppc_draws`` (default 30), ``ate_data_cells`` (default ``"heldout"``),
    ``ate_memory_mb`` (working-memory budget of the model ATE, default 1024).
    """
    if data.spec.n_perturbations == 0:
        return
    opts = dict(options or {})
    num_particles = int(opts.get("ate_particles", DEFAULT_PARTICLES))
    memory_mb = opts.get("ate_memory_mb")
    res = ate_results(
        run.model, run.guide, data, num_particles=num_particles, seed=seed, device=run.device,
        data_cells=opts.get("ate_data_cells", "heldout"), memory_mb=None if memory_mb is None else float(memory_mb),
    )
    block = {s: res["metrics"][s] for s in ATE_SPLITS}
    block["num_particles"] = num_particles
    if memory_mb is not None:
        block["memory_mb"] = float(memory_mb)
    block["composes"] = bool(getattr(run.model, "composes", True))
    block["data_cells"] = str(opts.get("ate_data_cells", "heldout"))
    if res["notes"]:
        block["notes"] = {lab: why for lab, why in res["notes"].items()}
    if data.spec.covariate_keys:
        block["covariates"] = (
            "the model ATE is computed at the first category of every covariate "
            f"({', '.join(f'{k}={c[0]}' for k, c in zip(data.spec.covariate_keys, data.spec.covariate_categories))}); "
            "the data ATE pools all cells"
        )
    if "metrics_true" in res:
        block["vs_true_ate"] = res["metrics_true"]
        block["data_vs_true_ate"] = res["metrics_data_vs_true"]
    results["ate"] = block
    for s in ("train", "test"):
        if s in results and isinstance(results[s], dict):
            results[s].update({k: v for k, v in res["metrics"][s].items()})
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res["model"].to_csv(out_dir / "ate_model.csv")
    res["data"].to_csv(out_dir / "ate_data.csv")
    if "true" in res:
        res["true"].to_csv(out_dir / "ate_true.csv")
    if opts.get("ate_ppc", True):
        from .ppc import posterior_predictive_check

        idata = posterior_predictive_check(run.model, run.guide, data, seed=seed, device=run.device,
                                           num_draws=int(opts.get("ppc_draws", 30)))
        try:
            idata.to_netcdf(str(out_dir / "ppc.nc"), engine="h5netcdf")
        except Exception:  # noqa: BLE001 - the export is optional; the plots still come
            pass
        res["idata"] = idata
    if opts.get("ate_plots", True):
        from . import plots

        plots.ate_scatter(res, out_dir / "ate_scatter.png", title=run.name)
        if "idata" in res:
            plots.ppc_plot(res["idata"], out_dir / "ppc_zero_fraction.png", var="zero_fraction")
        probs = getattr(run.guide, "mask_probabilities", None)
        if probs is not None:
            plots.mask_heatmap(probs().cpu().numpy(), list(data.spec.perturbations), out_dir / "mask_heatmap.png")


__all__.append("DEFAULT_PARTICLES")
