"""Training throughput of the zoo's models against a hand-written PyTorch step.

On a synthetic negative-binomial dataset shaped like the SAMS-VAE paper's Replogle set
(default 20,000 cells x 1,187 genes, 200 single perturbations + ~10% controls, 2,000-5,000
UMIs per cell), each registered model is trained at its registry (paper) settings through
the engine's real step (:func:`pyro_perturb.infer.engine.training_step`:
``elbo.differentiable_loss`` + clipping + Adam with parameter groups), interleaved
(A, B, A, B, ...) in the same process with a hand-written pure-PyTorch step (no Pyro) of
the same networks, likelihood, particles, KL terms and Adam. Reported: median cells/s over
the repetitions and the ratio engine / hand-written.

For SAMS-VAE (correlated guide) the engine is also timed with each speed-up of the training
step undone (``SAMS_STAGES``: the code before it, re-created here by patching the instances),
so the table shows the ratio before and after each change; a ``torch.profiler`` table of the current
step, the FLOPs of a step (``FlopCounterMode``) against the measured dense fp32 matmul rate,
and the held-out IWELBO time (2,000 cells x 100 particles) before/after are written too.

    OMP_NUM_THREADS=1 python bench/train_throughput.py            # full run
    python bench/train_throughput.py --cells 4000 --steps 3 --reps 2 --models sams_vae  # smoke
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import statistics
import time
import types
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

import pyro_perturb as pp
from pyro_perturb.infer.engine import TrainConfig, _param_groups, make_elbo, training_step
from pyro_perturb.likelihoods import NegativeBinomialCounts
from pyro_perturb.nn import broadcast_cat
from pyro_perturb.registry import build, get_entry, list_models

RESULTS = Path(__file__).parent / "results"
HAND_WRITTEN = ("sams_vae", "cpa_vae", "cvae")
DEFAULT_MODELS = ("sams_vae", "sams_vae_mf", "cpa_vae", "cvae", "svae_plus", "fcr")
# reference anchors (bench/results/reference_anchors.md): reference implementation, cells/s, and the targets (2x)
ANCHORS = {"sams_vae": (993, 1990), "cpa_vae": (1030, 2060), "cvae": (1144, 2290)}


# ----------------------------------------------------------------------------- data
def replogle_like(n_cells: int, n_genes: int, n_singles: int, control_fraction: float, seed: int):
    """AnnData of NB counts: a 10-d latent, sparse per-treatment shifts, softmax decoder.

    Library sizes are uniform in [2000, 5000]; inverse dispersions log-normal around 5.
    Every cell is a training cell (the benchmark times training steps only).
    """
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    n_latent = 10
    n_control = int(round(control_fraction * n_cells))
    labels = np.concatenate([np.full(n_control, -1), rng.integers(0, n_singles, n_cells - n_control)])
    rng.shuffle(labels)
    shifts = rng.normal(0, 1.5, (n_singles, n_latent)) * (rng.random((n_singles, n_latent)) < 0.2)
    z = rng.normal(size=(n_cells, n_latent)) + np.where(labels[:, None] >= 0, shifts[labels.clip(0)], 0.0)
    weights = rng.normal(0, 1 / math.sqrt(n_latent), (n_latent, n_genes))
    gene_bias = rng.normal(0, 1.5, n_genes)
    logits = z @ weights + gene_bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    library = rng.uniform(2000, 5000, n_cells)
    mu = library[:, None] * probs
    theta = np.exp(rng.normal(math.log(5.0), 0.5, n_genes))
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    names = np.array([f"p{t:03d}" for t in range(n_singles)])
    obs = pd.DataFrame(
        {"perturbation": np.where(labels >= 0, names[labels.clip(0)], "control"), "split": "train"},
        index=[f"c{i}" for i in range(n_cells)],
    )
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{g}" for g in range(n_genes)]))


# ------------------------------------------------------------- hand-written baselines
def _normal_log_prob(value, loc, scale):
    return -((value - loc) ** 2) / (2 * scale**2) - scale.log() - 0.5 * math.log(2 * math.pi)


def _nb_log_lik(model, gene_logits, batch):
    """The naive NB: torch.distributions (lgamma/digamma per particle), no validation."""
    lik = model.likelihood
    log_rate = batch.library.log().unsqueeze(-1) + torch.log_softmax(gene_logits, dim=-1)
    nb = torch.distributions.NegativeBinomial(
        total_count=lik.log_theta.exp(), logits=log_rate - lik.log_theta, validate_args=False
    )
    return nb.log_prob(batch.x).sum(-1)


def hand_written_loss(name: str, model, guide, batch, num_particles: int) -> torch.Tensor:
    """Negative ELBO of ``name`` written by hand (the same terms as Pyro's ``Trace_ELBO``).

    Particles are vectorised along a leading dim ``P``; local terms are scaled by
    ``n_cells / B`` like the ``"cells"`` plate, latent terms by ``batch.kl_weight``.
    """
    P, B = num_particles, batch.size
    x, d = batch.x, batch.d
    scale = batch.n_cells / B
    if name == "cvae":
        loc, sd = guide.encoder(torch.cat([guide.normalizer(x), d], dim=-1))
        z = loc + sd * torch.randn((P, *loc.shape))
        kl = _normal_log_prob(z, torch.zeros(()), torch.ones(())).sum(-1) - _normal_log_prob(z, loc, sd).sum(-1)
        log_lik = _nb_log_lik(model, model.decoder(torch.cat([z, d.expand(P, B, -1)], dim=-1)), batch)
        return -(scale * (log_lik + batch.kl_weight * kl).sum(-1)).mean()
    T, L = guide.n_treatments, guide.n_latent
    global_terms = 0.0
    if name == "sams_vae":
        # q(M): straight-through relaxed Bernoulli, scored with the Bernoulli mass of the hard value
        u = torch.rand((P, T, L)).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((guide.mask_logits + u.log() - (-u).log1p()) / guide.temperature)
        hard = soft.detach().round()
        M = soft + (hard - soft).detach()
        log_q_M = -F.binary_cross_entropy_with_logits(guide.mask_logits.expand(P, T, L), hard, reduction="none")
        p = model.mask_prior
        log_p_M = hard * math.log(p) + (1 - hard) * math.log1p(-p)
        eye = torch.eye(T).expand(P, T, T)
        e_loc, e_sd = guide.effect_encoder(torch.cat([M, eye], dim=-1))
        global_terms = (log_p_M - log_q_M).sum((-2, -1))
    else:  # cpa_vae: q(E) mean-field
        e_loc, e_sd = guide.E_loc, F.softplus(guide.E_raw_scale) + 1e-4
        e_loc, e_sd = e_loc.expand(P, T, L), e_sd.expand(P, T, L)
        M = None
    E = e_loc + e_sd * torch.randn((P, T, L))
    prior_sd = torch.tensor(model.embedding_prior_scale)
    global_terms = global_terms + (_normal_log_prob(E, torch.zeros(()), prior_sd) - _normal_log_prob(E, e_loc, e_sd)).sum((-2, -1))
    effect = E if M is None else E * M
    x_norm = guide.normalizer(x)
    if name == "sams_vae":  # the guide's encoder sees [x, offset] per particle
        offset = d @ effect
        z_loc, z_sd = guide.encoder(torch.cat([x_norm.expand(P, B, -1), offset], dim=-1))
    else:
        z_loc, z_sd = guide.encoder(x_norm)
    z_basal = z_loc + z_sd * torch.randn((P, B, L))
    kl = _normal_log_prob(z_basal, torch.zeros(()), torch.ones(())).sum(-1) - _normal_log_prob(z_basal, z_loc, z_sd).sum(-1)
    z = z_basal + d @ effect  # the model computes the offset again
    log_lik = _nb_log_lik(model, model.decoder(z), batch)
    elbo = scale * (log_lik + batch.kl_weight * kl).sum(-1) + global_terms
    return -elbo.mean()


# ------------------------------------------------ the code before each change (patches)
def _pyro_nb_distribution(self, gene_logits, library):
    """CountLikelihood.distribution before: Pyro's NegativeBinomial (lgamma per particle)."""
    log_rate = library.log().unsqueeze(-1) + torch.log_softmax(gene_logits, dim=-1)
    return dist.NegativeBinomial(total_count=self.theta, logits=log_rate - self.log_theta).to_event(1)


class _NBLgammaOnce(NegativeBinomialCounts):
    """The first step of the change: lgamma terms once per cell, per-draw part still
    ``(theta + x) * logsigmoid(-l) + x * l`` (negation + logsigmoid, two products)."""

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, _instance=self._get_checked_instance(_NBLgammaOnce, _instance))

    def log_prob(self, value):
        theta = self.compact_total_count
        tpx = theta + value
        coef = (torch.lgamma(tpx) - torch.lgamma(1.0 + value) - torch.lgamma(theta)).masked_fill(tpx == 0, 0.0)
        return tpx * F.logsigmoid(-self.logits) + value * self.logits + coef


def _nb_lgamma_once_distribution(self, gene_logits, library):
    log_rate = library.log().unsqueeze(-1) + torch.log_softmax(gene_logits, dim=-1)
    return _NBLgammaOnce(self.theta, logits=log_rate - self.log_theta).to_event(1)


def _concatenated_basal(self, batch, offset):
    """_ShiftGuideBase._basal before: encoder(cat([x, offset])) for every particle."""
    inputs = self.normalizer(batch.x)
    if offset is not None:
        inputs = broadcast_cat([inputs, offset])
    return self.encoder(inputs)


def _concatenated_effect_params(self, M):
    eye = torch.eye(self.n_treatments, dtype=M.dtype, device=M.device)
    return self.effect_encoder(broadcast_cat([M, eye]))


def undo(model, guide, changes: set[str]) -> None:
    """Re-create the code before the named changes on these instances."""
    if getattr(model, "likelihood", None) is not None and model.likelihood.kind == "nb":
        if "nb" in changes:
            model.likelihood.distribution = types.MethodType(_pyro_nb_distribution, model.likelihood)
        elif "nb_passes" in changes:
            model.likelihood.distribution = types.MethodType(_nb_lgamma_once_distribution, model.likelihood)
    if "split_encoder" in changes and hasattr(guide, "_basal"):
        guide._basal = types.MethodType(_concatenated_basal, guide)
        if hasattr(guide, "effect_encoder"):
            guide._effect_params = types.MethodType(_concatenated_effect_params, guide)


# ----------------------------------------------------------------------- step makers
class Trainer:
    """One independent copy of (model, guide, Adam) and a step function over batches."""

    def __init__(self, name, model, guide, cfg: TrainConfig, hand_written: bool = False,
                 undo_changes: set[str] = frozenset(), validate: bool | None = None):
        self.name, self.cfg, self.hand_written = name, cfg, hand_written
        self.validate = cfg.validate_distributions if validate is None else validate
        self.model, self.guide = copy.deepcopy(model), copy.deepcopy(guide)
        undo(self.model, self.guide, set(undo_changes))
        adversary = getattr(self.model, "adversary", None)
        exclude = set(id(p) for p in adversary.parameters()) if adversary is not None else set()
        multipliers = {**getattr(self.model, "lr_multipliers", {}), **getattr(self.guide, "lr_multipliers", {})}
        groups = _param_groups([self.model, self.guide], cfg, multipliers, exclude)
        self.optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.adv_optimizer = (
            torch.optim.Adam(adversary.parameters(), lr=getattr(self.model, "adversary_lr", cfg.lr))
            if adversary is not None else None
        )
        self.elbo = make_elbo(cfg.elbo, cfg.num_particles, self.model.max_plate_nesting)
        self.aux = getattr(self.model, "auxiliary_loss", None)
        self.params = [p for g in groups for p in g["params"]]

    def loss(self, batch) -> torch.Tensor:
        if self.hand_written:
            return hand_written_loss(self.name, self.model, self.guide, batch, self.cfg.num_particles)
        with pyro.validation_enabled(self.validate):
            return self.elbo.differentiable_loss(self.model, self.guide, batch)

    def step(self, batch) -> float:
        if self.hand_written:
            loss = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.clip_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_norm)
            self.optimizer.step()
            return loss.detach()
        return training_step(self.model, self.guide, batch, self.elbo, self.optimizer, self.cfg.clip_norm,
                             self.aux, self.adv_optimizer, validate_distributions=self.validate)


def time_steps(trainer: Trainer, batches, n_steps: int, start: int) -> float:
    """Seconds per step over ``n_steps`` steps (batches taken cyclically from ``start``)."""
    t0 = time.perf_counter()
    for i in range(n_steps):
        trainer.step(batches[(start + i) % len(batches)])
    return (time.perf_counter() - t0) / n_steps


def time_steps_with_loader(trainer: Trainer, data, batch_size: int, n_steps: int, seed: int) -> float:
    """As :func:`time_steps`, with the engine's loader (``data.batches``) inside the loop."""
    it = data.batches("train", batch_size, shuffle=True, seed=seed)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        trainer.step(next(it))
    return (time.perf_counter() - t0) / n_steps


def interleaved(trainers: dict, batches, args, loader_data=None) -> dict[str, list[float]]:
    """Warm each up, then ``args.reps`` rounds of ``args.steps`` steps each, A, B, A, B."""
    per_step = {k: [] for k in trainers}
    for k, tr in trainers.items():
        time_steps(tr, batches, args.warmup, 0)
    for rep in range(args.reps):
        for k, tr in trainers.items():
            if k.endswith("+ data.batches loader"):
                per_step[k].append(time_steps_with_loader(tr, loader_data, args.batch_size_override or tr.cfg.batch_size,
                                                          args.steps, seed=rep))
            else:
                per_step[k].append(time_steps(tr, batches, args.steps, rep * args.steps))
    return per_step


# ------------------------------------------------------------------------- the runs
def model_setup(name: str, data, args):
    entry = get_entry(name)
    cfg = TrainConfig(**{k: v for k, v in entry.train_defaults.items() if k in TrainConfig.keys()})
    if args.batch_size_override:
        cfg.batch_size = args.batch_size_override
    pyro.set_rng_seed(0)
    model, guide, _ = build(name, data.spec, {}, gene_stats=data.gene_stats("train"))
    batches = [b for b in data.batches("train", cfg.batch_size, shuffle=True, seed=0) if b.size == cfg.batch_size]
    return cfg, model, guide, batches[: args.max_batches]


SAMS_STAGES = [
    # (label, changes undone, Pyro distribution checks on)
    ("engine: before (Pyro NB, concatenated encoder input, checks on)", {"nb", "split_encoder"}, True),
    ("engine: + NB lgamma terms once per cell", {"nb_passes", "split_encoder"}, True),
    ("engine: + NB per-draw part in fewer full-size passes (softplus, addcmul)", {"split_encoder"}, True),
    ("engine: + split encoder first layer", set(), True),
    ("engine: + distribution checks off in training (current default)", set(), False),
]
CURRENT = "current default"



def run_model(name: str, data, args) -> list[dict]:
    cfg, model, guide, batches = model_setup(name, data, args)
    trainers: dict[str, Trainer] = {}
    if name == "sams_vae":
        for label, changes, validate in SAMS_STAGES:
            trainers[label] = Trainer(name, model, guide, cfg, undo_changes=changes, validate=validate)
        trainers["engine (current default) + data.batches loader"] = Trainer(name, model, guide, cfg)
    else:
        trainers["engine (current default)"] = Trainer(name, model, guide, cfg)
        if name in HAND_WRITTEN:
            trainers["engine: before (Pyro NB, checks on)"] = Trainer(name, model, guide, cfg, undo_changes={"nb"},
                                                                       validate=True)
    if name in HAND_WRITTEN:
        trainers["hand-written PyTorch (naive)"] = Trainer(name, model, guide, cfg, hand_written=True)
        # same-init sanity check of the baseline's math: similar loss on one batch
        with torch.no_grad():
            torch.manual_seed(1)
            l_hand = float(trainers["hand-written PyTorch (naive)"].loss(batches[0]))
            pyro.set_rng_seed(1)
            l_engine = float(next(iter(trainers.values())).loss(batches[0]))
        print(f"{name}: loss at init, engine {l_engine:.6g}, hand-written {l_hand:.6g}", flush=True)
    per_step = interleaved(trainers, batches, args, loader_data=data)
    rows = []
    base = per_step.get("hand-written PyTorch (naive)")
    for k, times in per_step.items():
        cells = [cfg.batch_size / t for t in times]
        row = {
            "model": name, "variant": k, "batch_size": cfg.batch_size, "num_particles": cfg.num_particles,
            "cells_per_s": statistics.median(cells), "cells_per_s_reps": [round(c, 1) for c in cells],
            "threads": torch.get_num_threads(),
        }
        if base is not None:
            # per-repetition ratios (same round, adjacent in time), then the median
            row["ratio_vs_hand_written"] = statistics.median([b / t for t, b in zip(times, base)])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile_sams(data, args) -> str:
    from torch.profiler import profile

    cfg, model, guide, batches = model_setup("sams_vae", data, args)
    tr = Trainer("sams_vae", model, guide, cfg)
    time_steps(tr, batches, 2, 0)
    with profile() as prof:
        time_steps(tr, batches, 3, 2)
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    # the optimizer's share (Adam over all parameter groups, one torch.optim instance)
    optim = sum(e.cpu_time_total for e in averages if e.key.startswith("Optimizer.step"))
    note = f"Adam steps (Optimizer.step, CPU total): {optim / 1e3:.1f} ms of {total / 1e3:.1f} ms ({optim / total:.1%})"
    return averages.table(sort_by="self_cpu_time_total", row_limit=20) + "\n" + note


def flop_rate(data, args, sams_cells_per_s: float | None) -> dict:
    """FLOPs of one SAMS-VAE engine step (forward + backward) and the sgemm rate."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, model, guide, batches = model_setup("sams_vae", data, args)
    tr = Trainer("sams_vae", model, guide, cfg)
    tr.step(batches[0])
    with FlopCounterMode(display=False) as counter:
        tr.step(batches[1 % len(batches)])
    flops = counter.get_total_flops()
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    peak = 2 * n**3 / statistics.median(times)
    # time steps of this trainer now, so the rate is measured next to the matmul rate
    step_s = time_steps(tr, batches, args.steps, 2)
    out = {
        "step_flops": flops, "sgemm_2048_flops_per_s": peak, "step_seconds": step_s,
        "achieved_flops_per_s": flops / step_s, "fraction_of_sgemm": flops / step_s / peak,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out), flush=True)
    return out


def time_iwelbo(data, args) -> list[dict]:
    """Held-out IWELBO of SAMS-VAE: ``args.iwelbo_cells`` cells x 100 particles, before/after."""
    from pyro_perturb.infer.iwelbo import iwelbo

    _, model, guide, _ = model_setup("sams_vae", data, args)
    idx = np.arange(min(args.iwelbo_cells, data.n_cells))
    K = args.iwelbo_particles
    old_chunk = max(1, min(K, 4_000_000 // data.spec.n_genes // 64))  # the former default: 52 x 64 cells
    old_sizes = dict(particle_chunk=old_chunk, batch_size=max(16, 4_000_000 // data.spec.n_genes // old_chunk))
    before = "before (Pyro NB, concatenated encoder input, 52 particles x 64 cells per call)"
    variants = {
        before: ({"nb", "split_encoder"}, old_sizes),
        "+ NB lgamma once per cell, split encoder (same chunking)": (set(), old_sizes),
        "+ small particle chunks, large cell batches (current default)": (set(), {}),
    }
    out = {k: [] for k in variants}
    values = {}
    for rep in range(args.iwelbo_reps):
        for k, (changes, sizes) in variants.items():
            m, g = copy.deepcopy(model), copy.deepcopy(guide)
            undo(m, g, changes)
            t0 = time.perf_counter()
            values[k] = iwelbo(m, g, data, split=None, indices=idx, num_particles=K, seed=0, **sizes)
            out[k].append(time.perf_counter() - t0)
    rows = []
    for k, times in out.items():
        rows.append({"variant": k, "cells": len(idx), "particles": K,
                     "seconds": statistics.median(times), "seconds_reps": [round(t, 2) for t in times],
                     "mean_iwelbo": float(values[k].mean()),
                     "max_abs_diff_vs_before_nats": float(np.abs(values[k] - values[before]).max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_results(rows, prof_table, flops, iw_rows, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.name
    payload = {"args": vars(args), "rows": rows, "flops": flops, "iwelbo": iw_rows,
               "torch": torch.__version__, "pyro": pyro.__version__, "machine": platform.machine()}
    (stem.with_suffix(".json")).write_text(json.dumps(payload, indent=1, default=str))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "variant", "batch_size", "num_particles", "cells_per_s",
                                          "ratio_vs_hand_written", "threads"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    lines = [
        "# Training throughput: engine vs hand-written PyTorch",
        "",
        "Analysis and what was left out: `train_throughput_notes.md`.",
        "",
        f"`python bench/train_throughput.py {' '.join(args.argv) or '(defaults)'}` — torch {torch.__version__}, pyro "
        f"{pyro.__version__}, {torch.get_num_threads()} thread(s); synthetic Replogle-shaped NB data "
        f"({args.cells} cells x {args.genes} genes, {args.singles} singles + {args.control_fraction:.0%} controls, "
        "2,000-5,000 UMIs/cell). Each variant is an independent copy of the same initial model trained on the "
        f"same batches; {args.warmup} warm-up steps, then {args.reps} interleaved rounds of {args.steps} steps "
        "(A, B, A, B); medians over rounds. Ratio = engine cells/s / hand-written cells/s, the median of the "
        "per-round ratios.",
        "",
        "| model | variant | batch | particles | cells/s (median) | cells/s per round | ratio vs hand-written |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio_vs_hand_written']:.3f}" if "ratio_vs_hand_written" in r else "n/a (no hand-written step)"
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch_size']} | {r['num_particles']} | "
                     f"{r['cells_per_s']:.0f} | {', '.join(f'{c:.0f}' for c in r['cells_per_s_reps'])} | {ratio} |")
    if flops:
        lines += [
            "",
            "## FLOP rate (SAMS-VAE engine step, current default)",
            "",
            f"* FLOPs per step (forward + backward, `FlopCounterMode`: matmuls): {flops['step_flops'] / 1e9:.2f} GFLOP",
            f"* step time: {flops['step_seconds']:.3f} s -> {flops['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s",
            f"* dense fp32 matmul (2048 x 2048 sgemm, same process and threads): "
            f"{flops['sgemm_2048_flops_per_s'] / 1e9:.1f} GFLOP/s",
            f"* achieved / sgemm: **{flops['fraction_of_sgemm']:.2f}**",
        ]
    if iw_rows:
        lines += ["", f"## Held-out IWELBO, SAMS-VAE ({iw_rows[0]['cells']} cells x {iw_rows[0]['particles']} particles)", "",
                  "Pyro's distribution checks are off in all three (iwelbo.py now turns them off itself). "
                  "Different chunking draws different particles: the per-cell values then differ by Monte Carlo "
                  "noise, the mean should not.", "",
                  "| variant | seconds (median) | per round | mean IWELBO (nats/cell) | max abs per-cell difference vs before |",
                  "|---|---|---|---|---|"]
        for r in iw_rows:
            lines.append(f"| {r['variant']} | {r['seconds']:.1f} | {', '.join(map(str, r['seconds_reps']))} | "
                         f"{r['mean_iwelbo']:.2f} | {r['max_abs_diff_vs_before_nats']:.2e} |")
    if prof_table:
        lines += ["", "## Profile of the current SAMS-VAE engine step (3 steps, self CPU time)", "", "```", prof_table, "```"]
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md/.csv/.json")


def main(args) -> int:
    torch.set_num_threads(args.threads)
    known = {e.name for e in list_models()}
    unknown = [m for m in args.models if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; registered: {sorted(known)}")
    adata = replogle_like(args.cells, args.genes, args.singles, args.control_fraction, args.seed)
    data = pp.PerturbationData.from_anndata(adata)
    rows = []
    for name in args.models:
        try:
            rows += run_model(name, data, args)
        except Exception as exc:  # a model that cannot run on this data is reported, not fatal
            print(f"{name}: failed: {exc!r}", flush=True)
            rows.append({"model": name, "variant": f"failed: {type(exc).__name__}: {exc}", "batch_size": "",
                         "num_particles": "", "cells_per_s": float("nan"), "cells_per_s_reps": []})
    prof_table = profile_sams(data, args) if args.profile else ""
    sams = [r for r in rows if r["model"] == "sams_vae" and r["variant"].endswith(CURRENT + ")")]
    flops = flop_rate(data, args, sams[0]["cells_per_s"] if sams else None) if args.flops else {}
    iw_rows = time_iwelbo(data, args) if args.iwelbo_reps > 0 else []
    write_results(rows, prof_table, flops, iw_rows, args)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=1187)
    p.add_argument("--singles", type=int, default=200)
    p.add_argument("--control-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-batches", type=int, default=16, help="distinct batches cycled through")
    p.add_argument("--batch-size-override", type=int, default=None, help="instead of each model's registry batch size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--iwelbo-reps", type=int, default=1, help="0: skip the IWELBO timing")
    p.add_argument("--iwelbo-cells", type=int, default=2000)
    p.add_argument("--iwelbo-particles", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="train_throughput")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    return args


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
