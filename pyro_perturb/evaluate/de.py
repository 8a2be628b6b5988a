"""Model-based differential expression (DE) with decisions taken from the model's posterior.

Question, per gene ``g``: does perturbation ``A`` change the expression of ``g`` by more
than ``delta`` relative to a reference group ``B`` (the control by default)?

Normalised expression
    For an observed cell ``i`` with latents ``z_i`` (its local sites) and the global
    latents ``globals`` (e.g. SAMS-VAE's ``E``, ``M``), the model's normalised expression
    is the mean of its count site ``"x"`` per :data:`~pyro_perturb.normalize.LIBRARY`
    counts: ``h_ig = 1e4 * E[x_ig | z_i, globals] / l_i`` (``1e4 * rho_ig`` for the NB
    and Poisson likelihoods; the site distribution's ``.mean``, so a zero-inflated one
    gives ``1e4 (1 - pi) mu / l``). The Gaussian likelihood models
    ``y = log1p(1e4 x / l) ~ Normal(m, s)``; its normalised expression is
    ``E[e^y] - 1 = exp(m + s^2 / 2) - 1``. Each cell is decoded under its own dosage and
    covariates: A's cells as perturbed, B's cells as they are.

Log fold change (log2 units, pseudocount ``c`` in counts per 1e4, default 1, as
:func:`~pyro_perturb.normalize.pseudobulk_lfc`)
    * ``mode="group"`` (default): ``LFC_g = log2(mean_{i in A} h_ig + c) -
      log2(mean_{j in B} h_jg + c)``, the log fold change of the two groups' mean
      normalised expression over their observed cells: the model's version of a
      pseudobulk fold change, with a truth in a simulator (the same statistic of the
      true proportions of the same cells).
    * ``mode="pairs"``: scVI's ``LFC_g = log2(h_ag + c) - log2(h_bg + c)`` for a random
      cell ``a`` of A and a random cell ``b`` of B; its posterior mixes cell-to-cell
      variation into the uncertainty (Boyeau et al. 2019).

Posterior
    Each posterior draw ``s`` takes one draw of the global latents from the guide,
    shared by every cell of both groups, and one draw of each cell's local latents
    from the local posterior ``p(z_i | x_i, globals_s)``, approximated in one of two
    ways (``method``):

    * ``"plain"``: the guide's ``q(z_i | x_i, globals_s)`` taken as the posterior (one
      draw per cell and draw);
    * ``"importance"``: sampling importance resampling. ``K = n_particles`` particles
      ``z_ik ~ r(z | x_i, globals_s)`` from a proposal ``r``, self-normalised weights
      ``w_ik ∝ p(x_i, z_ik | globals_s) / r(z_ik | x_i, globals_s)`` (summing to 1 over
      ``k`` per cell; the log weights are those of the held-out IWELBO,
      :func:`~pyro_perturb.infer.iwelbo.particle_traces`), one particle resampled with
      probabilities ``w_i``. The proposal is the defensive mixture
      ``r = a q + (1 - a) q_wide`` (:class:`DefensiveProposal`): ``q_wide`` is the guide
      with every local Normal site's scale multiplied by ``scale_factor``. A VAE's
      ``q`` is typically narrower than the posterior (the reverse KL it minimises is
      mode-seeking); the wide component covers the posterior's tails, and the guide's
      own component bounds the weights, ``p / r <= p / (a q)``, so their second moment is
      at most ``1 / a`` times that of importance sampling with the guide alone
      (defensive / multiple importance sampling; Lopez et al. 2020 combine proposals
      fitted with other objectives, here the mixture is fixed, so it works with any zoo
      model without training anything).

    The global latents are not reweighted (their posterior is the guide's).

Decision
    ``prob_de_g = P(|LFC_g| > delta | data)``. The decision set is the largest set of
    genes whose posterior expected false discovery rate, the mean of ``1 - prob_de``
    over the set, is at most ``fdr``: genes sorted by ``prob_de`` descending, the set is
    the longest prefix whose running mean of ``1 - prob_de`` stays at or below ``fdr``
    (ties enter together; :func:`fdr_decisions`).

Reference: Lopez, Boyeau, Yosef, Jordan, Regier, "Decision-Making with Auto-Encoding
Variational Bayes", NeurIPS 2020; Boyeau et al., "Deep generative models for detecting
differential expression in single cells", 2019.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .. import contract
from ..infer.iwelbo import particle_traces, trace_log_weights
from ..normalize import LIBRARY

__all__ = [
    "DEFAULT_DELTA",
    "METHODS",
    "MIN_CELLS",
    "MODES",
    "DefensiveProposal",
    "differential_expression",
    "fdr_decisions",
    "normalized_expression",
    "self_normalized_weights",
]

#: default effect-size threshold, log2 units: a fold change of 2^0.25 = 1.19 (scvi-tools'
#: default ``delta``; bench/results/de/README.md)
DEFAULT_DELTA = 0.25
#: ways to approximate the local posterior (module docstring)
METHODS = ("importance", "plain")
#: definitions of the log fold change (module docstring)
MODES = ("group", "pairs")
#: fewest observed cells per group
MIN_CELLS = 3
#: particles x cells x genes per traced chunk (float32: 32 MB per full-size buffer)
_CHUNK_ELEMENTS = 8_000_000


# --------------------------------------------------------------------------- the decision rule


def fdr_decisions(prob_de: np.ndarray, fdr: float) -> tuple[np.ndarray, np.ndarray]:
    """Decision at posterior expected FDR.

    Args:
        prob_de: ``(G,)`` posterior probabilities that each gene is DE.
        fdr: the target ``alpha`` in [0, 1].

    Returns:
        ``(is_de (G,) bool, expected_fdr (G,))``: ``expected_fdr_g`` is the posterior
        expected FDR of the set of genes whose ``prob_de`` is at least gene g's (the mean
        of ``1 - prob_de`` over it); it never decreases as ``prob_de`` decreases, so the
        largest set with expected FDR ``<= fdr`` is ``expected_fdr <= fdr``. Genes with
        equal probabilities are in or out together.
    """
    p = np.asarray(prob_de, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"prob_de must be 1-D, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("prob_de must hold probabilities in [0, 1]")
    if not 0.0 <= float(fdr) <= 1.0:
        raise ValueError(f"fdr must lie in [0, 1], got {fdr}")
    order = np.argsort(-p, kind="stable")
    sorted_p = p[order]
    running = np.cumsum(1.0 - sorted_p) / np.arange(1, len(p) + 1)
    # a tie group takes the running mean at its last member
    last_of_tie = np.r_[sorted_p[1:] != sorted_p[:-1], True] if len(p) else np.zeros(0, bool)
    ends = np.flatnonzero(last_of_tie)
    group_end = ends[np.searchsorted(ends, np.arange(len(p)))]
    expected = np.empty_like(p)
    expected[order] = running[group_end]
    # float rounding of the running sums must not break the rule at exactly alpha
    return expected <= float(fdr) + 1e-12, expected


def self_normalized_weights(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``w_k = exp(lw_k) / sum_j exp(lw_j)`` along ``dim`` (the particles): they sum to 1."""
    return torch.softmax(log_weights, dim=dim)


# --------------------------------------------------------------------------- the proposal


class DefensiveProposal(Messenger):
    """Replace the guide's local Normal sites ``q`` by ``a q + (1 - a) q_wide``.

    Wrap a guide with it (``DefensiveProposal(a, c)(guide)``): every unobserved sample
    site inside the ``"cells"`` plate whose distribution is a Normal (possibly with
    ``to_event``) becomes the two-component mixture of the guide's Normal (weight
    ``guide_weight``) and the same Normal with its scale times ``scale_factor``, one
    component per cell for the whole latent vector (``MixtureSameFamily``): a sample and
    a density of the mixture, which is what the importance weights need. Other local
    sites keep the guide's distribution; their names are collected in ``unchanged``.

    Args:
        guide_weight: ``a`` in (0, 1]; 1 leaves the guide as it is.
        scale_factor: ``c >= 1``, the wide component's scale multiplier.
    """

    def __init__(self, guide_weight: float = 0.5, scale_factor: float = 2.0) -> None:
        super().__init__()
        if not 0.0 < float(guide_weight) <= 1.0:
            raise ValueError(f"guide_weight must lie in (0, 1], got {guide_weight}")
        if not float(scale_factor) >= 1.0:
            raise ValueError(f"scale_factor must be >= 1, got {scale_factor}")
        self.guide_weight = float(guide_weight)
        self.scale_factor = float(scale_factor)
        self.widened: set[str] = set()
        self.unchanged: set[str] = set()

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        if contract.CELL_PLATE not in {f.name for f in msg["cond_indep_stack"]}:
            return
        if self.guide_weight >= 1.0:
            return
        fn, event_dims = msg["fn"], 0
        while isinstance(fn, torch.distributions.Independent):
            event_dims += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        if not isinstance(fn, torch.distributions.Normal):
            self.unchanged.add(msg["name"])
            return
        loc = fn.loc.expand(fn.batch_shape)
        scale = fn.scale.expand(fn.batch_shape)
        axis = -(event_dims + 1)  # the component axis, just left of the event dims
        components = dist.Normal(torch.stack([loc, loc], axis), torch.stack([scale, scale * self.scale_factor], axis))
        components = components.to_event(event_dims) if event_dims else components
        logits = loc.new_tensor([math.log(self.guide_weight), math.log1p(-self.guide_weight)])
        mixture = dist.Categorical(logits=logits.expand(msg["fn"].batch_shape + (2,)))
        msg["fn"] = dist.MixtureSameFamily(mixture, components)
        self.widened.add(msg["name"])


# --------------------------------------------------------------------------- posterior draws


def normalized_expression(fn, library: torch.Tensor, kind: str) -> torch.Tensor:
    """The model's normalised expression (counts per 1e4) from its count site's
    distribution ``fn`` (``(..., B)`` batch of ``(G,)`` vectors) and the cells' library
    sizes ``(B,)``: ``1e4 * fn.mean / l``, or for the Gaussian likelihood (of
    ``log1p(1e4 x / l)``) ``exp(mean + variance / 2) - 1``. Returns ``(..., B, G)``."""
    if kind == "gaussian":
        return torch.expm1(fn.mean + 0.5 * fn.variance).clamp_min(0.0)
    return fn.mean * (LIBRARY / library.unsqueeze(-1))


def _global_draw(guide, batch) -> dict[str, torch.Tensor]:
    """One draw of the guide's global sites (``batch.x = None``: no local site)."""
    trace = poutine.trace(guide).get_trace(replace(batch, x=None))
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        and contract.CELL_PLATE not in {f.name for f in site["cond_indep_stack"]}
    }


def _local_draws(model, sampler, data, cells: np.ndarray, n_particles: int, globals_: dict, weighted: bool,
                 kind: str, device: torch.device, ess: list) -> torch.Tensor:
    """One posterior draw of the normalised expression of each cell, ``(len(cells), G)``:
    the resampled particle (``weighted``) or a single draw of the sampler."""
    G = data.spec.n_genes
    k = n_particles if weighted else 1
    chunk = max(1, _CHUNK_ELEMENTS // (k * G))
    out = []
    for start in range(0, len(cells), chunk):
        batch = data.batch(cells[start : start + chunk], device=device)
        guide_trace, model_trace, particle_dim = particle_traces(model, sampler, batch, k, globals_)
        h = normalized_expression(model_trace.nodes[contract.OBSERVED_SITE]["fn"], batch.library, kind)
        h = h.reshape((-1,) + h.shape[-2:]).expand(k, batch.size, G)  # (K, B, G)
        if weighted:
            logw = trace_log_weights(guide_trace, model_trace, particle_dim, k, batch.size)
            logw = torch.nan_to_num(logw, nan=-math.inf, posinf=-math.inf)
            # a cell whose every particle has zero density keeps equal weights (no correction)
            logw = torch.where(torch.isfinite(logw).any(0, keepdim=True), logw, torch.zeros_like(logw))
            w = self_normalized_weights(logw, dim=0)  # (K, B)
            ess.append((1.0 / (w**2).sum(0) / k).cpu())
            pick = torch.multinomial(w.T, 1).squeeze(-1)  # (B,)
        else:
            pick = torch.zeros(batch.size, dtype=torch.long, device=device)
        out.append(h[pick, torch.arange(batch.size, device=device)])
    return torch.cat(out)


# --------------------------------------------------------------------------- the estimator


def _group_cells(labels: np.ndarray, label: str, n_cells: int | None, rng, role: str, known: list[str]) -> np.ndarray:
    cells = np.flatnonzero(labels == label)
    if len(cells) == 0:
        shown = ", ".join(repr(x) for x in known[:8])
        raise ValueError(
            f"unknown {role} label {label!r}: no cell of the data carries it; known labels "
            f"({len(known)}): {shown}{' ...' if len(known) > 8 else ''}"
        )
    if len(cells) < MIN_CELLS:
        raise ValueError(f"{role} label {label!r} has {len(cells)} cells; differential expression needs at least {MIN_CELLS}")
    if n_cells is not None and len(cells) > n_cells:
        cells = np.sort(rng.choice(cells, size=n_cells, replace=False))
    return cells


@torch.no_grad()
def differential_expression(
    run,
    data=None,
    perturbation: str = "",
    control: str | None = None,
    delta: float = DEFAULT_DELTA,
    fdr: float = 0.05,
    method: str = "importance",
    n_particles: int = 20,
    n_cells: int | None = 300,
    n_samples: int = 50,
    mode: str = "group",
    pseudocount: float = 1.0,
    split: str | None = None,
    seed: int = 0,
    guide_weight: float = 0.5,
    scale_factor: float = 2.0,
) -> pd.DataFrame:
    """Differential expression of ``perturbation``'s cells against ``control``'s (module
    docstring: definitions, the two posteriors, the decision rule).

    Args:
        run: a trained :class:`~pyro_perturb.run.Run` (any zoo model).
        data: AnnData, ``.h5ad`` path or encoded data holding both groups' cells
            (default: the run's training data).
        perturbation: label of group A (``"A"``, ``"A+B"``).
        control: label of group B (default: the run's control label).
        delta: effect-size threshold on ``|LFC|``, log2 units.
        fdr: target posterior expected false discovery rate of the decision set.
        method: ``"importance"`` (resampled from self-normalised importance weights
            under the defensive proposal) or ``"plain"`` (the guide as the posterior).
        n_particles: importance particles per cell and posterior draw.
        n_cells: at most this many cells per group (a seeded random subset; None: all).
        n_samples: posterior draws (each with its own draw of the global latents).
        mode: ``"group"`` (LFC of the groups' mean normalised expression) or
            ``"pairs"`` (scVI's random cell pairs).
        pseudocount: ``c`` of the LFC, counts per 1e4.
        split: use only that split's cells (default: all).
        seed: random seed (cells, latents, resampling, pairs).
        guide_weight, scale_factor: the proposal (:class:`DefensiveProposal`).

    Returns:
        DataFrame indexed by gene (the run's gene order) with ``lfc_mean``, ``lfc_sd``,
        ``lfc_low`` / ``lfc_high`` (2.5 / 97.5 % posterior quantiles), ``prob_de``
        (``P(|LFC| > delta)``), ``expected_fdr`` (of the set of genes at least as
        probable, :func:`fdr_decisions`), ``is_de`` (in the decision set), ``mean_a`` /
        ``mean_b`` (posterior mean normalised expression per group, counts per 1e4).
        ``attrs``: ``expected_fdr`` and ``n_de`` of the decision set, the settings, the
        cells used (``cells_a`` / ``cells_b``, positions in the encoded data) and, with
        importance sampling, ``mean_relative_ess`` (mean over cells and draws of the
        weights' effective sample size over ``n_particles``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    if not 0.0 <= fdr <= 1.0:
        raise ValueError(f"fdr must lie in [0, 1], got {fdr}")
    for name, value in (("n_particles", n_particles), ("n_samples", n_samples)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if n_cells is not None and int(n_cells) < MIN_CELLS:
        raise ValueError(f"n_cells must be >= {MIN_CELLS} (or None: all cells), got {n_cells}")
    if not pseudocount > 0:
        raise ValueError(f"pseudocount must be > 0, got {pseudocount}")

    if contract.has_adjacency(run.model):
        raise ValueError(
            f"model {run.name!r} is a gene-graph model: its parameters are point estimates and a cell has no "
            "latent state to take a posterior over, so there is no posterior probability of differential "
            "expression to compute; its predicted knockout effects are run.ate([...])"
        )
    data = run.data if data is None else run.encode(data)
    spec = data.spec
    label_a = run._canonical(perturbation)[0] if str(perturbation).strip() else ""
    label_b = run._canonical(control)[0] if control is not None else spec.control
    if label_a == label_b:
        raise ValueError(f"perturbation and control are the same label {label_a!r}")
    idx = data.indices(split)
    labels = data.label_names(idx)
    known = list(pd.Series(labels).value_counts().index)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, 7]))
    cells_a = idx[_group_cells(labels, label_a, n_cells, rng, "perturbation", known)]
    cells_b = idx[_group_cells(labels, label_b, n_cells, rng, "control", known)]

    model, guide = run.model, run.guide
    model.eval()
    guide.eval()
    device = run.device
    kind = contract.likelihood_kind(model)
    weighted = method == "importance"
    sampler = DefensiveProposal(guide_weight, scale_factor)(guide) if weighted else guide
    probe = data.batch(cells_b[:1], device=device)
    draws_a, draws_b, ess = [], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), pyro.validation_enabled(False):
        pyro.set_rng_seed(int(seed) % 2**32)
        for _ in range(int(n_samples)):
            globals_ = _global_draw(guide, probe)
            draws_a.append(_local_draws(model, sampler, data, cells_a, n_particles, globals_, weighted, kind, device, ess))
            draws_b.append(_local_draws(model, sampler, data, cells_b, n_particles, globals_, weighted, kind, device, ess))
    h_a = torch.stack(draws_a).double().cpu().numpy()  # (S, N_a, G)
    h_b = torch.stack(draws_b).double().cpu().numpy()  # (S, N_b, G)

    if mode == "group":
        lfc = np.log2(h_a.mean(1) + pseudocount) - np.log2(h_b.mean(1) + pseudocount)  # (S, G)
    else:
        n_pairs = max(h_a.shape[1], h_b.shape[1])
        pair_rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, 8]))
        a = pair_rng.integers(h_a.shape[1], size=(h_a.shape[0], n_pairs))
        b = pair_rng.integers(h_b.shape[1], size=(h_b.shape[0], n_pairs))
        rows = np.arange(h_a.shape[0])[:, None]
        lfc = (np.log2(h_a[rows, a] + pseudocount) - np.log2(h_b[rows, b] + pseudocount)).reshape(-1, spec.n_genes)
    prob_de = (np.abs(lfc) > delta).mean(0)
    is_de, expected = fdr_decisions(prob_de, fdr)
    low, high = np.quantile(lfc, [0.025, 0.975], axis=0)
    frame = pd.DataFrame(
        {
            "lfc_mean": lfc.mean(0),
            "lfc_sd": lfc.std(0),
            "lfc_low": low,
            "lfc_high": high,
            "prob_de": prob_de,
            "expected_fdr": expected,
            "is_de": is_de,
            "mean_a": h_a.mean((0, 1)),
            "mean_b": h_b.mean((0, 1)),
        },
        index=pd.Index(spec.genes, name="gene"),
    )
    frame.attrs.update(
        perturbation=label_a, control=label_b, method=method, mode=mode, delta=float(delta), fdr=float(fdr),
        n_de=int(is_de.sum()), expected_fdr=float((1.0 - prob_de[is_de]).mean()) if is_de.any() else 0.0,
        n_cells_a=len(cells_a), n_cells_b=len(cells_b), n_samples=int(n_samples),
        n_particles=int(n_particles) if weighted else 1, pseudocount=float(pseudocount), units="log2",
        cells_a=cells_a.tolist(), cells_b=cells_b.tolist(),
        mean_relative_ess=float(torch.cat(ess).mean()) if ess else float("nan"),
        proposal=(f"{guide_weight:g} guide + {1 - guide_weight:g} guide with scale x{scale_factor:g}"
                  if weighted else "guide"),
    )
    return frame
