"""Out-of-distribution transfer to held-out perturbations (docs/evaluation.md, "OOD transfer").

The trained encoder, decoder and dispersion are frozen; only the held-out labels'
per-label parameters (sVAE family: the rows of the shift ``mu`` and of the mask logits
``alpha``) are re-initialised and fitted by SVI on part of the held-out cells (the "fit"
cells); the held-out ELBO and IWELBO are then reported on the other held-out cells (the
"eval" cells, disjoint from the fit cells, stratified by label). With ``fit_fraction=0``
nothing is fitted and every held-out cell is evaluated.

Which parameters are fitted is the model's and the guide's business: each may define
``transfer_parameters(label_codes, reset=True) -> [(parameter, rows)]`` (rows of dim 0 to
train, re-initialised when ``reset``; :func:`pyro_perturb.contract.transfer_parameters`). A model with no per-label parameter (VAE,
beta-VAE: the prior is N(0, I) for every cell) has nothing to fit: its transfer is just
the evaluation of the frozen model on the held-out cells, and the result says so
(``n_parameters_fitted = 0``).

ELBO and IWELBO per cell use the same log importance weights
(:func:`pyro_perturb.infer.iwelbo.log_weights`): one draw of the globals per particle,
shared by all cells, no prior credit for globals; ``elbo`` is their mean over particles,
``iwelbo`` their log-mean-exp.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import torch

from .. import contract
from ..data import PerturbationData
from .engine import make_elbo, resolve_device
from .iwelbo import log_weights


def heldout_labels(data: PerturbationData, split: str = "test") -> np.ndarray:
    """Label codes of the cells of ``split`` (the held-out perturbations), control excluded."""
    codes = np.unique(data.labels[data.indices(split)])
    return codes[codes > 0]


def _split_cells(
    data: PerturbationData, codes: np.ndarray, split: str, fit_fraction: float, seed: int,
    fit_cells_per_label: int | None = None,
):
    rng = np.random.default_rng(seed)
    idx = data.indices(split)
    idx = idx[np.isin(data.labels[idx], codes)]
    fit, held = [], []
    for code in codes:
        cells = rng.permutation(idx[data.labels[idx] == code])
        n_fit = int(round(fit_fraction * len(cells)))
        if fit_fraction > 0 and len(cells) > 1:
            n_fit = min(max(n_fit, 1), len(cells) - 1)
        # the eval cells do not depend on fit_cells_per_label (comparable scores)
        fit.append(cells[:n_fit][:fit_cells_per_label] if fit_cells_per_label is not None else cells[:n_fit])
        held.append(cells[n_fit:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


@torch.no_grad()
def _scores(model, guide, data, indices, num_particles, batch_size, seed, device):
    logws = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pyro.set_rng_seed(seed)
        globals_k = None
        for start in range(0, len(indices), batch_size):
            sub = indices[start : start + batch_size]
            logw, globals_k = log_weights(model, guide, data.batch(sub, device=device), num_particles, globals_k)
            logws.append(logw)
    logw = torch.cat(logws, dim=1).double()
    elbo = logw.mean(0)
    iwelbo = torch.logsumexp(logw, 0) - math.log(num_particles)
    return elbo.cpu().numpy(), iwelbo.cpu().numpy()


def transfer(
    model,
    guide,
    data: PerturbationData,
    split: str = "test",
    labels: np.ndarray | None = None,
    fit_fraction: float = 0.5,
    fit_cells_per_label: int | None = None,
    max_epochs: int = 50,
    min_steps: int = 500,
    lr: float = 1e-2,
    batch_size: int = 128,
    num_particles: int = 100,
    elbo: str = "meanfield",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Fit the held-out labels' parameters with everything else frozen; score held-out cells.

    ``fit_fraction`` of each held-out label's cells are the fit cells, the rest the eval
    cells; ``fit_cells_per_label`` caps the fit cells per label (few-shot transfer) without
    changing the eval cells. Training runs ``max_epochs`` epochs over the fit cells, more
    if needed to make at least ``min_steps`` optimizer steps.

    Modifies the model and guide in place (their held-out rows). Returns a JSON-ready dict:
    ``transfer_elbo``, ``transfer_iwelbo`` (means per eval cell, nats), their standard
    errors, ``n_fit_cells``, ``n_eval_cells``, ``n_labels``, ``n_parameters_fitted``,
    ``transfer_epochs``, and ``before_elbo`` / ``before_iwelbo`` (the same cells scored before
    fitting, with the re-initialised held-out parameters).
    """
    if not 0.0 <= fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must lie in [0, 1), got {fit_fraction}")
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    model.to(device)
    guide.to(device)
    codes = heldout_labels(data, split) if labels is None else np.asarray(labels, dtype=np.int64)
    if len(codes) == 0:
        raise ValueError(f"no perturbed cells in split {split!r}: nothing to transfer to")
    fit_idx, eval_idx = _split_cells(data, codes, split, fit_fraction, seed, fit_cells_per_label)
    code_t = torch.as_tensor(codes, dtype=torch.long)

    pairs = contract.transfer_parameters(model, guide, code_t, reset=True)
    n_fitted = int(sum(len(rows) * int(np.prod(p.shape[1:])) for p, rows in pairs))

    model.eval()
    guide.eval()
    eval_batch = max(16, 2_000_000 // max(1, num_particles * data.spec.n_genes))
    before = _scores(model, guide, data, eval_idx, num_particles, eval_batch, seed + 1, device)

    epochs = 0
    if pairs and len(fit_idx):
        all_params = [p for m in (model, guide) for p in m.parameters()]
        saved = {id(p): p.requires_grad for p in all_params}
        trained = {id(p) for p, _ in pairs}
        for p in all_params:
            p.requires_grad_(id(p) in trained)
        masks = {}
        for p, rows in pairs:
            keep = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            keep[rows.to(p.device)] = True
            masks[id(p)] = keep.view(-1, *([1] * (p.dim() - 1)))
        params = [p for p, _ in pairs]
        optimizer = torch.optim.Adam(params, lr=lr)
        loss_fn = make_elbo(elbo, 1, model.max_plate_nesting)
        pyro.set_rng_seed(seed)
        model.train()  # training mode (e.g. the sVAE's exact mask expectation)
        guide.train()
        caught = warnings.catch_warnings()
        caught.__enter__()
        # PyroModule warns about every frozen (requires_grad=False) parameter: intended here
        warnings.filterwarnings("ignore", message=".*was not registered in the param store.*")
        steps_per_epoch = math.ceil(len(fit_idx) / batch_size)
        n_epochs = max(max_epochs, math.ceil(min_steps / steps_per_epoch))  # few fit cells: more epochs
        try:
            for epoch in range(n_epochs):
                for batch in data.batches(
                    None, batch_size, shuffle=True, seed=seed * 1_000_003 + epoch, device=device, indices=fit_idx
                ):
                    loss = loss_fn.differentiable_loss(model, guide, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(masks[id(p)])  # only the held-out rows move
                    optimizer.step()
                epochs += 1
        finally:
            caught.__exit__(None, None, None)
            for p in all_params:
                p.requires_grad_(saved[id(p)])
    model.eval()
    guide.eval()
    elbo_v, iwelbo_v = _scores(model, guide, data, eval_idx, num_particles, eval_batch, seed + 1, device)

    def se(v):
        return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0

    return {
        "transfer_elbo": float(elbo_v.mean()),
        "transfer_elbo_se": se(elbo_v),
        "transfer_iwelbo": float(iwelbo_v.mean()),
        "transfer_iwelbo_se": se(iwelbo_v),
        "before_elbo": float(before[0].mean()),
        "before_iwelbo": float(before[1].mean()),
        "n_fit_cells": int(len(fit_idx)),
        "n_eval_cells": int(len(eval_idx)),
        "n_labels": int(len(codes)),
        "n_parameters_fitted": n_fitted,
        "transfer_epochs": int(epochs),
        "num_particles": int(num_particles),
        "fit_fraction": float(fit_fraction),
    }


def transfer_run(run, data, **kwargs) -> dict:
    """:func:`transfer` on a :class:`~pyro_perturb.run.Run` (data: AnnData, path or
    PerturbationData encoded with the run's vocabulary)."""
    data = run.encode(data)
    out = transfer(run.model, run.guide, data, device=run.device, **kwargs)
    out["model"] = run.name
    return out
