"""``pyro-perturb demo``: the main job on built-in data.

Simulates a combinatorial Perturb-seq-like screen with known sparse latent targets, in
which half the double perturbations are held out of training (test cells are only
unseen combinations), trains SAMS-VAE (correlated guide) on it, and evaluates: held-out
IWELBO, the average treatment effects by posterior predictive (per treatment split,
against the data ATE on held-out cells and the simulator's true ATE), the model beside
the baselines (no change, mean effect, additive, empirical) on held-out cells, the
learned masks against the true sparse targets, an ArviZ posterior predictive check and
plots. Writes the run, ``metrics.json``, ``comparison.csv``, ``ate_model.csv`` /
``ate_data.csv``, ``ppc.nc``, ``ate_scatter.png``, ``ppc_zero_fraction.png``,
``mask_heatmap.png`` and ``summary.txt`` (the summary printed at the end, for a person:
what was fitted, the held-out doubles' ``pearson_delta`` and ``mse_delta`` of the model
beside the additive, no-change and mean-effect baselines, the files written; the numbers
are in ``metrics.json``). Training shows a progress bar (on stderr).

The full demo caps training at ``DEMO_EPOCHS`` epochs (the registry default is longer)
so that it takes a few minutes on 2 CPU cores; ``--quick`` uses tiny settings (seconds).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

DEMO_MODEL = "sams_vae"
DEMO_EPOCHS = 100
DEMO_ATE_PARTICLES = 1000


def run_demo(out: str | Path = "demo_out", quick: bool = False, seed: int = 0) -> dict:
    from . import contract
    from .data import simulate
    from .evaluate import write_metrics
    from .evaluate.metrics import match_latents, target_identification
    from .run import fit

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = (
        dict(n_singles=6, n_doubles=6, cells_per_perturbation=30, n_control_cells=80, n_genes=40,
             n_latent=4, n_ate_draws=200)
        if quick
        else {}
    )
    adata = simulate.combinatorial(seed=seed, frac_combinations_train=0.5, **sizes)
    adata.write_h5ad(out / "data.h5ad")
    print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes -> {out / 'data.h5ad'}")
    settings = dict(max_epochs=3, n_latent=8, n_hidden=32) if quick else dict(max_epochs=DEMO_EPOCHS)
    run_dir = out / "run"
    if (run_dir / "checkpoint.pt").exists():
        import shutil

        shutil.rmtree(run_dir)
    t_fit = time.perf_counter()
    run = fit(adata, model=DEMO_MODEL, out=run_dir, seed=seed, progress=True, **settings)
    fit_seconds = time.perf_counter() - t_fit
    print(f"trained {DEMO_MODEL} for {len(run.history)} epochs -> {run_dir}")
    results = run.evaluate(
        run.data, num_particles=10 if quick else 100, out_dir=out, seed=seed,
        ate_particles=50 if quick else DEMO_ATE_PARTICLES, ppc_draws=4 if quick else 30,
    )
    masks = contract.mask_probabilities(run.guide)
    if masks is not None:
        gt = adata.uns["ground_truth"]
        order = [masks.labels.index(p) for p in gt["perturbations"]]
        match, _ = match_latents(adata.obsm["z_true"], run.latents(run.data)["X_latent"])
        results["mask_vs_true_targets"] = target_identification(gt["targets"], masks.probabilities[order], match)
    write_metrics(results, out / "metrics.json")
    n_train = len(run.data.indices("train"))
    fitted = {
        "model": DEMO_MODEL,
        "cells": int(adata.n_obs),
        "train_cells": int(n_train),
        "genes": int(adata.n_vars),
        "epochs": len(run.history),
        "steps": int(run.history[-1].get("step", 0)) if run.history else 0,
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - t0,
    }
    text = demo_summary(results, fitted, out)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return results


#: predictors of the demo's headline, in column order
HEADLINE_PREDICTORS = ("model", "additive", "no_change", "mean_effect")
HEADLINE_METRICS = ("pearson_delta", "mse_delta")


def demo_summary(results: dict, fitted: dict, out: Path) -> str:
    """The demo's closing summary for a person: what was fitted, the headline figures on
    the held-out doubles beside the baselines, and the files written."""
    lines = [
        "",
        f"== pyro-perturb demo: done in {fitted['seconds']:.0f} s ==",
        f"fitted   {fitted['model']} on {fitted['cells']} cells x {fitted['genes']} genes "
        f"({fitted['train_cells']} training cells): {fitted['epochs']} epochs, {fitted['steps']} steps, "
        f"{fitted['fit_seconds']:.0f} s",
    ]
    comparison = results.get("comparison") or {}
    if "skipped" not in comparison and comparison:
        n = comparison["lognorm_delta"]["unseen"]["n_labels"]
        lines.append(
            f"held-out doubles ({n} combinations never trained on; {comparison['control_cells']} held-out controls; "
            f"model at {comparison['ate_library']} depth, basal states from {comparison.get('basal', 'prior')}):"
        )
        header = "".join(p.rjust(13) for p in HEADLINE_PREDICTORS)
        lines.append(" " * 31 + header)
        for stat in comparison["statistics"]:
            entry = comparison[stat]["unseen"]
            for metric in HEADLINE_METRICS:
                values = [entry.get(p, {}).get(metric, np.nan) for p in HEADLINE_PREDICTORS]
                cells = "".join((f"{v:.3f}" if np.isfinite(v) else "-").rjust(13) for v in values)
                lines.append(f"  {stat + ' ' + metric:<29}{cells}")
            wins = entry.get("winner", {})
            if wins:
                beaten = [m for m, w in wins.items() if w["model_wins"]]
                lines.append(f"  {stat}: the model beats the best baseline on {len(beaten)} of {len(wins)} metrics"
                             + (f" ({', '.join(beaten)})" if beaten else ""))
    ate = results.get("ate", {})
    true_r = ate.get("vs_true_ate", {}).get("test", {}).get("ate_pearson")
    target_f1 = results.get("mask_vs_true_targets", {}).get("f1")
    extras = [f"test IWELBO {results['test']['iwelbo']:.2f} nats/cell" if results.get("test", {}).get("iwelbo") is not None else None,
              f"ATE r vs the true ATE (held-out doubles) {true_r:.3f}" if true_r is not None else None,
              f"target F1 {target_f1:.2f}" if target_f1 is not None else None]
    extras = [e for e in extras if e]
    if extras:
        lines.append("also     " + "; ".join(extras))
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix != ".png") + ["summary.txt"]
    plots = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    lines.append(f"wrote    {out}/: {', '.join(dict.fromkeys(files))}; run in {out / 'run'}/")
    if plots:
        lines.append(f"plots    {', '.join(plots)}")
    lines.append(f"all numbers: {out / 'metrics.json'}; the comparison table: {out / 'comparison.csv'}")
    return "\n".join(lines)
