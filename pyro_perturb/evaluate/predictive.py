"""Model ATE by posterior predictive under intervention.

For each of ``num_particles`` particles the global latents are drawn from the guide, the
basal state from the prior (the guide samples no local site when ``batch.x is None``),
the dosage is set with :func:`pyro.poutine.do` to the treatment's (and to 0 for the
control), the library is fixed at 1e4, counts are sampled, normalised like the data
(:func:`~pyro_perturb.normalize.lognormalize`) and averaged over particles
(:func:`model_ate`). The ATE of a label is that mean minus the control's.

Combinations are first-class: the ATE of ``"A+B"`` is available whenever A and B are in
the vocabulary, because the dosage of ``"A+B"`` is ``d_A + d_B``. Each request row draws
its local sites from its own random stream
(:class:`~pyro_perturb.evaluate.streams.RowStreams`), and the treatment batch is sized
to a working-memory budget (:func:`~pyro_perturb.evaluate.ate_memory.ate_batch_for_memory`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Predictive

from .. import contract
from ..data import Batch
from ..normalize import LIBRARY
from .ate_memory import DEFAULT_MEMORY_MB, ate_batch_for_memory, guide_hidden_width, widest_layer
from .streams import RowStream, RowStreams, row_seed, seed_int

__all__ = ["DEFAULT_PARTICLES", "DEFAULT_PARTICLE_BATCH", "model_ate"]

#: the paper's particle count for the model ATE
DEFAULT_PARTICLES = 2500
#: default particles per random block (see :func:`model_ate`)
DEFAULT_PARTICLE_BATCH = 100


class _DosageSite:
    """The model with its dosage as a sample site ``"d"`` that ``poutine.do`` can set;
    its local sites are drawn by ``streams``."""

    def __init__(self, model, streams: RowStreams) -> None:
        self.model = model
        self.streams = streams

    def __call__(self, batch: Batch):
        d = pyro.sample("d", dist.Delta(batch.d, event_dim=2))
        with self.streams:
            return self.model(replace(batch, d=d), observe=False)


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
) -> pd.DataFrame:
    """Model ATE of ``labels`` (combinations included) by posterior predictive.

    The particles are split into blocks of ``particle_batch``. For each block the global
    latents are drawn once from the guide (``Predictive(guide)``) and shared by every
    treatment and the control (common random numbers); then for each batch of request
    rows (the control once, then the treatments; ``x = None``, library ``library``)
    ``Predictive(model, posterior_samples=globals)`` draws the basal state from the prior
    and the counts, with ``poutine.do`` setting the dosage site. Counts are normalised
    to ``library`` (by their sampled total) and ``log2(1 + x)``, summed over particles.

    Random streams: the globals of block ``j`` come from torch's generator seeded by
    ``(seed, j)``; each request row's local draws from its own stream seeded by
    ``(seed, j, label)``, except the basal (normal) noise, which every row of block ``j``
    shares (common random numbers, see :class:`~pyro_perturb.evaluate.streams.RowStream`).
    For a given ``seed``,
    ``num_particles`` and ``particle_batch``, a label's ATE is therefore bit-identical
    whatever the treatment batching (``treatment_batch``, ``memory_mb``, threads) and
    whichever other labels are asked; the ATE of the control label is exactly 0.

    Args:
        labels: perturbation labels (``"A"``, ``"A+B"``).
        num_particles: posterior predictive particles (paper: 2,500).
        seed: the random seed.
        device: default: the model's.
        library: library size of the drawn cells and of the normalisation.
        treatment_batch: request rows per step; default: the most that fit ``memory_mb``.
        particle_batch: particles per random block (and per step).
        memory_mb: working-memory budget (MB; default
            :data:`~pyro_perturb.evaluate.ate_memory.DEFAULT_MEMORY_MB` when
            ``treatment_batch`` is not given): peak memory above the process's before the
            call, estimated by :func:`~pyro_perturb.evaluate.ate_memory.ate_working_memory`
            (fitted to peak RSS, about 210 MB of it fixed); the largest treatment batch
            that fits is used. If one treatment of ``particle_batch`` particles does not
            fit, fewer particles per block are used (results then differ in Monte Carlo
            noise only); a budget below one row of one particle raises ValueError.
        num_threads: threads drawing rows in parallel on CPU (default: torch's).

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
            contract.n_latent(model), spec.n_perturbations, threads,
            hidden=widest_layer(model, exclude=G), guide_hidden=guide_hidden_width(guide),
        )
        treatment_batch = budget_rows if treatment_batch is None else min(treatment_batch, budget_rows)
    sums = torch.zeros((len(rows), G), dtype=torch.float64, device=device)
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    try:
        # argument validation of every distribution is a full pass over (particles, rows,
        # genes) tensors per site and cannot fail on the model's own parameters here
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), pyro.validation_enabled(False):
            for block, p0 in enumerate(range(0, num_particles, particle_batch)):
                k = min(particle_batch, num_particles - p0)
                torch.manual_seed(seed_int(np.random.SeedSequence([int(seed) % 2**63, block])))
                probe = spec.request_batch([control], library, device=device)
                globals_ = Predictive(guide, num_samples=k, parallel=True, return_sites=None)(probe)
                for start in range(0, len(rows), treatment_batch):
                    chunk = rows[start : start + treatment_batch]
                    batch = spec.request_batch(chunk, library, device=device)
                    shared = np.random.SeedSequence([int(seed) % 2**63, block, 1])
                    streams = RowStreams(
                        [RowStream(row_seed(seed, block, lab), device, shared) for lab in chunk], pool
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
