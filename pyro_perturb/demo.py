"""``pyro-perturb demo``: the main job on built-in data.

Simulates a combinatorial Perturb-seq-like screen with known sparse latent targets, in
which half the double perturbations are held out of training (test cells are only
unseen combinations), trains SAMS-VAE (correlated guide) on it, and evaluates: held-out
IWELBO, the average treatment effects by posterior predictive (per treatment split,
against the data ATE on held-out cells and the simulator's true ATE), the learned
masks against the true sparse targets, an ArviZ posterior predictive check and plots.
Writes the run, ``metrics.json``, ``ate_model.csv`` / ``ate_data.csv``, ``ppc.nc``,
``ate_scatter.png``, ``ppc_zero_fraction.png``, ``mask_heatmap.png`` and ``summary.txt``.

The full demo caps training at ``DEMO_EPOCHS`` epochs (the registry default is longer)
so that it takes a few minutes on 2 CPU cores; ``--quick`` uses tiny settings (seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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
    run = fit(adata, model=DEMO_MODEL, out=run_dir, seed=seed, **settings)
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
    ate = results.get("ate", {})
    summary = {
        "model": DEMO_MODEL,
        "cells": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "epochs": len(run.history),
        "test_iwelbo": results["test"].get("iwelbo"),
        "ate_pearson_test_treatments": ate.get("test", {}).get("ate_pearson"),
        "ate_pearson_test_vs_true": ate.get("vs_true_ate", {}).get("test", {}).get("ate_pearson"),
        "target_f1": results.get("mask_vs_true_targets", {}).get("f1"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.txt").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return results
