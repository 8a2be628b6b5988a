"""Held-out importance-weighted ELBO (docs/evaluation.md, "Held-out IWELBO"), for any model of the zoo.

For each of K particles one draw of the global latents is taken from the guide and shared
by all cells; per cell::

    IWELBO_i = logmeanexp_k [ log p(x_i | z_ik, globals_k) + log p(z_ik) - log q(z_ik | ...) ]

where z are the sites inside the ``"cells"`` plate. Global latents get no prior credit
(their log p - log q is left out), as in the SAMS-VAE paper's evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from ..data import PerturbationData

_PARTICLES = "_iwelbo_particles"


def _cell_terms(trace, particle_dim: int, sign: float, skip_observed: bool) -> torch.Tensor | None:
    """Sum of ``sign * log_prob`` over the ``"cells"``-plate sites -> ``(K, B)``."""
    total = None
    for site in trace.nodes.values():
        if site["type"] != "sample" or (skip_observed and site["is_observed"]):
            continue
        frames = {f.name: f for f in site["cond_indep_stack"]}
        if "cells" not in frames:
            continue
        lp = site["log_prob"]
        cell_dim = frames["cells"].dim
        n_dims = -particle_dim
        lp = lp.reshape((1,) * (n_dims - lp.dim()) + lp.shape) if lp.dim() < n_dims else lp
        lp = lp.movedim((particle_dim, cell_dim), (0, 1))
        lp = lp.reshape(lp.shape[0], lp.shape[1], -1).sum(-1)
        total = sign * lp if total is None else total + sign * lp
    return total


def _global_values(trace) -> dict:
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and "cells" not in {f.name for f in site["cond_indep_stack"]}
    }


@torch.no_grad()
def particle_traces(model, guide, batch, num_particles: int, global_values: dict | None = None):
    """The guide's and the replayed model's traces of ``num_particles`` particles (the
    particle plate at dim ``-(max_plate_nesting + 1)``), subsample sites pruned, with
    their ``log_prob`` computed; the global sites are set to ``global_values`` when given.

    Returns ``(guide_trace, model_trace, particle_dim)``. The guide may be wrapped by a
    messenger that changes its local sites' distributions (a proposal other than the
    guide, :mod:`pyro_perturb.evaluate.de`): the log weights then use its densities.
    """
    nest = model.max_plate_nesting
    particle_dim = -(nest + 1)
    condition = global_values or {}
    # Pyro's distribution checks off: they scan every K x B x G argument (a large share
    # of the time; bench/results/train_throughput.md); counts are checked when loaded
    with pyro.validation_enabled(False):
        with pyro.plate(_PARTICLES, num_particles, dim=particle_dim, device=batch.device):
            guide_trace = poutine.trace(poutine.condition(guide, data=condition)).get_trace(batch)
            model_trace = poutine.trace(
                poutine.replay(poutine.condition(model, data=condition), trace=guide_trace)
            ).get_trace(batch)
        # plates' subsample sites carry no density (Pyro's ELBOs prune them too)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
    return guide_trace, model_trace, particle_dim


@torch.no_grad()
def log_weights(model, guide, batch, num_particles: int, global_values: dict | None = None):
    """Per-particle, per-cell log importance weights ``(K, B)`` and the global draws used."""
    guide_trace, model_trace, particle_dim = particle_traces(model, guide, batch, num_particles, global_values)
    logw = trace_log_weights(guide_trace, model_trace, particle_dim, num_particles, batch.size)
    return logw, (global_values or _global_values(guide_trace))


def trace_log_weights(guide_trace, model_trace, particle_dim: int, num_particles: int, n_cells: int) -> torch.Tensor:
    """``log p(x_i, z_ik | globals_k) - log q(z_ik | ...)`` ``(K, B)`` from the traces of
    :func:`particle_traces` (the ``"cells"``-plate sites only)."""
    logp = _cell_terms(model_trace, particle_dim, 1.0, skip_observed=False)
    logq = _cell_terms(guide_trace, particle_dim, -1.0, skip_observed=True)
    logw = logp if logq is None else logp + logq
    return logw.expand(num_particles, n_cells)


@torch.no_grad()
def iwelbo(
    model,
    guide,
    data: PerturbationData,
    split: str | None = "test",
    num_particles: int = 100,
    batch_size: int | None = None,
    particle_chunk: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """Per-cell IWELBO ``(n_cells,)`` of a split (or of ``indices``), in nats.

    Memory stays bounded: particles are processed in chunks of ``particle_chunk`` and
    cells in batches of ``batch_size``, so that ``chunk x batch x genes`` stays near
    4 million entries unless set otherwise. The guide's global networks (e.g. SAMS-VAE's
    ``q(E | M)``) run once per (chunk, batch) for ``chunk`` particles, so the defaults
    take small particle chunks and large cell batches (~512 cells): at 1,187 genes,
    chunks of 6 particles and 561 cells took 0.77x the time of 52 particles x 64 cells
    (bench/results/train_throughput.md).
    """
    device = torch.device(device)
    model.eval()
    guide.eval()
    idx = data.indices(split) if indices is None else np.asarray(indices)
    if len(idx) == 0:
        return np.zeros(0)
    budget = 4_000_000 // max(1, data.spec.n_genes)
    if particle_chunk is None:
        particle_chunk = max(1, min(num_particles, budget // 512))
    if batch_size is None:
        batch_size = max(16, budget // particle_chunk)
    chunks = [min(particle_chunk, num_particles - s) for s in range(0, num_particles, particle_chunk)]
    per_chunk = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pyro.set_rng_seed(seed)
        for k in chunks:
            globals_k = None
            columns = []
            for start in range(0, len(idx), batch_size):
                sub = idx[start : start + batch_size]
                # positions keep the batch's order; the plate size is the batch itself
                batch = data.batch(sub, device=device)
                logw, globals_k = log_weights(model, guide, batch, k, globals_k)
                columns.append(logw)
            per_chunk.append(torch.cat(columns, dim=1))
    logw = torch.cat(per_chunk, dim=0)
    return (torch.logsumexp(logw, dim=0) - math.log(num_particles)).double().cpu().numpy()
