"""Posterior predictive check, exported to ArviZ ``InferenceData``.

For every perturbation label the model can represent (control included), up to
``max_cells`` held-out cells of that label are taken with their observed dosage and
library size. ``num_draws`` draws of the global latents come from the guide (one
``Predictive`` call, shared by every label so that a draw is one coherent posterior
sample); for each draw the model samples the basal state from its prior and the counts
(``Predictive`` with those global samples). Per draw, label and gene the summary
statistics are

* ``mean``: mean over cells of ``log2(1 + 1e4 x / l)``,
* ``variance``: its variance over cells,
* ``zero_fraction``: fraction of cells with a zero count,
* ``ate``: ``mean`` of the label minus ``mean`` of the control (non-control labels),

and the same statistics of the observed cells form ``observed_data``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyro
import torch
from pyro.infer import Predictive

from ..data import PerturbationData
from ..normalize import LIBRARY, lognormalize
from .data_stats import cell_indices, representable_labels

_BUDGET = 8_000_000


def _stats(x: torch.Tensor, library_scale: float = LIBRARY) -> dict[str, torch.Tensor]:
    """x: (..., n, G) counts -> per-gene statistics over the cell axis (-2)."""
    ln = lognormalize(x.double(), library_scale)
    return {
        "mean": ln.mean(-2),
        "variance": ln.var(-2, unbiased=False),
        "zero_fraction": (x == 0).double().mean(-2),
    }


@torch.no_grad()
def posterior_predictive_check(
    model,
    guide,
    data: PerturbationData,
    num_draws: int = 30,
    max_cells: int = 64,
    cells="heldout",
    seed: int = 0,
    device=None,
):
    """Observed and posterior predictive summary statistics as ``az.InferenceData``.

    Returns an ``InferenceData`` with groups ``posterior_predictive`` (dims chain, draw,
    perturbation, gene) and ``observed_data`` (perturbation, gene) holding ``mean``,
    ``variance``, ``zero_fraction`` (all labels) and ``ate`` (labels except the control,
    coordinate ``treatment``).
    """
    import arviz as az

    if device is None:
        device = next(iter(model.parameters()), torch.zeros(0)).device
    device = torch.device(device)
    model.eval()
    guide.eval()
    spec = data.spec
    idx_pool = cell_indices(data, cells)
    names = data.label_names()
    rng = np.random.default_rng(seed)
    present = [lab for lab in spec.labels if lab in set(names.tolist())]
    present += sorted(set(names.tolist()) - set(present))
    labels, _ = representable_labels(model, data, present)
    if spec.control not in labels:
        raise ValueError("the posterior predictive check needs control cells")
    labels = [spec.control] + [lab for lab in labels if lab != spec.control]
    chosen = {}
    for lab in labels:
        pool = idx_pool[names[idx_pool] == lab]
        if len(pool) == 0:
            pool = np.flatnonzero(names == lab)
        if len(pool) > max_cells:
            pool = np.sort(rng.choice(pool, max_cells, replace=False))
        chosen[lab] = pool
    G = spec.n_genes
    pp = {k: np.zeros((num_draws, len(labels), G)) for k in ("mean", "variance", "zero_fraction")}
    obs = {k: np.zeros((len(labels), G)) for k in ("mean", "variance", "zero_fraction")}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pyro.set_rng_seed(seed)
        # one set of global draws, shared by every label
        first = data.batch(chosen[spec.control][:1], device=device)
        globals_ = Predictive(guide, num_samples=num_draws, parallel=True)(replace(first, x=None))
        globals_ = {k: v for k, v in globals_.items() if k != "_RETURN"}
        per_label_cells = max(len(v) for v in chosen.values())
        per_chunk = max(1, _BUDGET // max(1, num_draws * per_label_cells * G))
        for start in range(0, len(labels), per_chunk):
            chunk = labels[start : start + per_chunk]
            idx = np.concatenate([chosen[lab] for lab in chunk])
            owner = np.concatenate([np.full(len(chosen[lab]), j) for j, lab in enumerate(chunk)])
            # cells in index order: the predictive draws then match earlier releases exactly
            order = np.argsort(idx, kind="stable")
            idx, owner = idx[order], owner[order]
            batch = data.batch(idx, device=device)
            x_obs = batch.x
            predictive = Predictive(model, posterior_samples=globals_, num_samples=num_draws, parallel=True, return_sites=("x",))
            x_pp = predictive(replace(batch, x=None))["x"].reshape(num_draws, len(idx), G)
            for j, lab in enumerate(chunk):
                rows = torch.as_tensor(np.flatnonzero(owner == j), device=device)
                s_pp = _stats(x_pp[:, rows])
                s_obs = _stats(x_obs[rows])
                for k in pp:
                    pp[k][:, start + j] = s_pp[k].cpu().numpy()
                    obs[k][start + j] = s_obs[k].cpu().numpy()
    pp["ate"] = pp["mean"][:, 1:] - pp["mean"][:, :1]
    obs["ate"] = obs["mean"][1:] - obs["mean"][:1]
    coords = {"perturbation": labels, "treatment": labels[1:], "gene": list(spec.genes)}
    dims = {k: ["perturbation", "gene"] for k in ("mean", "variance", "zero_fraction")}
    dims["ate"] = ["treatment", "gene"]
    return az.from_dict(
        posterior_predictive={k: v[None] for k, v in pp.items()},
        observed_data=obs,
        coords=coords,
        dims=dims,
    )


__all__ = ["posterior_predictive_check"]
