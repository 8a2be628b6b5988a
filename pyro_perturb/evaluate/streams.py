"""Per-row random streams for posterior predictive draws (used by the model ATE).

A posterior predictive over a batch of request rows (one row per treatment) normally
draws every site from torch's global generator, so a row's values depend on which rows
are batched with it. :class:`RowStreams`, a Pyro messenger, draws the local sites row by
row instead, each request row from its own :class:`RowStream` seeded by
:func:`row_seed` (seed, particle block, label): a label's draws then do not depend on
the batching, on the other labels asked, or on the threads that draw the rows.

It relies on two Pyro internals, both imported here only: the name of the particle
plate that ``pyro.infer.Predictive`` vectorises over and the messenger stack, where that
plate is found (it sits outside the model, so a site's ``cond_indep_stack`` does not hold
it yet when this messenger, entered inside the model, sees the site).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyro.distributions as dist
import torch
from pyro.infer.predictive import _predictive_vectorize_plate_name as _PARTICLE_PLATE
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK

__all__ = ["RowStream", "RowStreams", "particle_plate", "row_seed", "seed_int"]


def row_seed(seed: int, block: int, label: str) -> np.random.SeedSequence:
    """The random stream of one request row (label) in one particle block.

    Keyed by the label's text, so a label's draws do not depend on which other labels
    are asked, in which order, or how they are batched."""
    words = np.frombuffer(hashlib.blake2b(label.encode(), digest_size=16).digest(), dtype=np.uint32)
    return np.random.SeedSequence([int(seed) % 2**63, int(block), *words.tolist()])


def seed_int(seq: np.random.SeedSequence) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` from a seed sequence."""
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


class RowStream:
    """One request row's random streams: ``torch.Generator``s on the run's device.
    Exact samplers: torch's own (the NegativeBinomial is torch's Gamma-Poisson mixture,
    drawn with this row's generator, seeded from a :func:`row_seed` sequence).

    Normal (latent) sites are drawn as ``loc + scale * eps`` with ``eps`` from a
    generator seeded by ``shared`` (the particle block only), the same for every row:
    treatment and control rows then share their basal noise as well as their globals
    (common random numbers), which leaves each arm's expectation unchanged and removes
    the basal-state noise from their difference, the ATE."""

    def __init__(self, seq: np.random.SeedSequence, device: torch.device, shared: np.random.SeedSequence | None = None) -> None:
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed_int(seq))
        self.latent_gen = self.gen
        if shared is not None:
            self.latent_gen = torch.Generator(device=device)
            self.latent_gen.manual_seed(seed_int(shared))

    def normal(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return loc + scale * torch.randn(loc.shape, generator=self.latent_gen, dtype=loc.dtype, device=loc.device)

    def poisson(self, rate: torch.Tensor) -> torch.Tensor:
        return torch.poisson(rate, generator=self.gen)

    def negative_binomial(self, total_count: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``Poisson(Gamma(total_count, 1) * exp(logits))``, as torch's NegativeBinomial."""
        gamma = torch._standard_gamma(total_count.contiguous(), generator=self.gen)
        rate = gamma.clamp_min_(torch.finfo(gamma.dtype).tiny).mul_(logits.exp())
        return torch.poisson(rate, generator=self.gen)


class RowStreams(Messenger):
    """Draws the local sites (those in the ``"cells"`` plate) of a posterior predictive
    row by row, each request row from its own :class:`RowStream`.

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

    def __init__(self, streams: list[RowStream], pool: ThreadPoolExecutor | None) -> None:
        super().__init__()
        self.streams = streams
        self.pool = pool

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        if not any(f.name == "cells" for f in msg["cond_indep_stack"]):
            return
        fn = msg["fn"]
        family = _family(fn)
        if family is None:
            return
        plate = particle_plate()
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


def particle_plate():
    """``Predictive``'s particle plate if it is on the messenger stack (None during the
    shape probes ``Predictive`` runs first, without it)."""
    for frame in _PYRO_STACK:
        if getattr(frame, "name", None) == _PARTICLE_PLATE and hasattr(frame, "dim"):
            return frame
    return None


def _family(fn) -> tuple[str, tuple[torch.Tensor, ...]] | None:
    """``(stream method, parameters)`` of a (possibly Independent) distribution that
    :class:`RowStream` can draw, else None."""
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
