"""Calibration of model-based differential expression (pyro_perturb.evaluate.de).

Simulated data (the combinatorial simulator, whose ground truth holds the true decoder and
every cell's true latent): for each seed, fit cvae and sams_vae at small settings, run DE
of every single perturbation against the control with the plain posterior (the guide) and
with importance sampling, and score the decision sets at nominal posterior expected FDR
0.05 / 0.1 / 0.2 against the truth: a gene is truly DE when the true group LFC,
``log2(mean 1e4 rho(z_true) + 1)`` of the same cells of the perturbation minus that of the
same control cells, exceeds ``delta`` in absolute value (the estimand of
``mode="group"``); the population version (``z_basal ~ N(0, I)``, 20,000 draws per
label) is scored too.

Real data (``--tasks real``; skipped when the files are absent): Papalexi 2021 (ECCITE-seq,
knockouts vs non-targeting) and Kang 2018 (IFN-beta stimulated vs control PBMC, cell type
as covariate), top-variance genes, cvae; agreement of the model's decisions with a
cell-level Welch t-test on log2(1 + counts per 1e4) of the same cells (Benjamini-Hochberg
at the same level, and the same |pseudobulk LFC| > delta filter): Jaccard of the decision sets, top-20
overlap, Spearman correlation of the model's LFC with the pseudobulk LFC. Reported, not tuned to.

Usage::

    python bench/de_calibration.py --quick                 # 1 seed, smaller data (a minute)
    python bench/de_calibration.py --seeds 3               # simulated calibration (bench/results/de/README.md)
    python bench/de_calibration.py --tasks real            # Papalexi and Kang against a Welch t-test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"
ALPHAS = (0.05, 0.1, 0.2)
METHODS = ("plain", "importance")


def true_group_lfc(adata, cells_a, cells_b, pseudocount=1.0):
    from pyro_perturb.data import simulate

    dec = adata.uns["ground_truth"]["decoder"]
    z = np.asarray(adata.obsm["z_true"], dtype=np.float64)
    a = simulate.decoder_proportions(dec, z[cells_a]).mean(0) * 1e4
    b = simulate.decoder_proportions(dec, z[cells_b]).mean(0) * 1e4
    return np.log2(a + pseudocount) - np.log2(b + pseudocount)


def true_population_lfc(adata, label, n=20000, seed=0, pseudocount=1.0):
    from pyro_perturb.data import simulate

    gt = adata.uns["ground_truth"]
    row = list(gt["perturbations"]).index(label)
    shift = np.asarray(gt["shifts"], dtype=np.float64)[row]
    z = np.random.default_rng(seed).standard_normal((n, shift.shape[0]))
    a = simulate.decoder_proportions(gt["decoder"], z + shift).mean(0) * 1e4
    b = simulate.decoder_proportions(gt["decoder"], z).mean(0) * 1e4
    return np.log2(a + pseudocount) - np.log2(b + pseudocount)


def score(prob_de, truth, delta, alpha):
    from pyro_perturb.evaluate.de import fdr_decisions

    is_de, expected = fdr_decisions(prob_de, alpha)
    true_de = np.abs(truth) > delta
    tp = int((is_de & true_de).sum())
    fp = int((is_de & ~true_de).sum())
    return {"tp": tp, "fp": fp, "n_true": int(true_de.sum()), "n_called": int(is_de.sum()),
            "expected_fdr": float((1 - prob_de[is_de]).mean()) if is_de.any() else 0.0}


def simulated(args, log):
    from pyro_perturb.data import simulate
    from pyro_perturb.evaluate.de import differential_expression
    from pyro_perturb.run import fit

    rows = []
    sizes = dict(n_singles=4 if args.quick else 8, n_doubles=0, n_genes=100 if args.quick else 200,
                 cells_per_perturbation=100 if args.quick else 150, n_control_cells=300 if args.quick else 400,
                 n_ate_draws=10)
    for seed in range(args.seeds):
        adata = simulate.combinatorial(seed=seed, **sizes)
        singles = list(adata.uns["ground_truth"]["perturbations"])
        for model in args.models:
            t0 = time.time()
            run = fit(adata, model=model, max_epochs=args.epochs, n_latent=10, n_hidden=64, seed=seed)
            fit_s = time.time() - t0
            for label in singles:
                population = true_population_lfc(adata, label, seed=seed)
                for method in METHODS:
                    t0 = time.time()
                    frame = differential_expression(run, adata, label, delta=args.delta, method=method,
                                                    n_particles=args.particles, n_samples=args.samples,
                                                    n_cells=None, seed=seed, guide_weight=args.guide_weight,
                                                    scale_factor=args.scale_factor)
                    de_s = time.time() - t0
                    on_cells = true_group_lfc(adata, frame.attrs["cells_a"], frame.attrs["cells_b"])
                    p = frame["prob_de"].to_numpy()
                    lfc = frame["lfc_mean"].to_numpy()
                    for truth_name, truth in (("cells", on_cells), ("population", population)):
                        true_de = np.abs(truth) > args.delta
                        base = {"seed": seed, "model": model, "perturbation": label, "method": method,
                                "truth": truth_name, "fit_s": fit_s, "de_s": de_s,
                                "lfc_rmse": float(np.sqrt(((lfc - truth) ** 2).mean())),
                                "brier": float(((p - true_de) ** 2).mean()),
                                "ess": frame.attrs["mean_relative_ess"]}
                        for alpha in ALPHAS:
                            rows.append({**base, "alpha": alpha, **score(p, truth, args.delta, alpha)})
            log(f"seed {seed} {model}: fit {fit_s:.0f}s, {len(singles)} perturbations done")
    return pd.DataFrame(rows)


def summarize(raw):
    g = raw.groupby(["truth", "model", "method", "alpha", "seed"])
    per_seed = g.agg(tp=("tp", "sum"), fp=("fp", "sum"), n_true=("n_true", "sum"), n_called=("n_called", "sum"),
                     expected_fdr=("expected_fdr", "mean"), lfc_rmse=("lfc_rmse", "mean"), brier=("brier", "mean"),
                     ess=("ess", "mean")).reset_index()
    per_seed["fdr"] = per_seed.fp / per_seed.n_called.clip(lower=1)
    per_seed["tpr"] = per_seed.tp / per_seed.n_true.clip(lower=1)
    out = per_seed.groupby(["truth", "model", "method", "alpha"]).agg(
        empirical_fdr=("fdr", "mean"), fdr_sd=("fdr", "std"), tpr=("tpr", "mean"), tpr_sd=("tpr", "std"),
        called=("n_called", "mean"), true_de=("n_true", "mean"), expected_fdr=("expected_fdr", "mean"),
        lfc_rmse=("lfc_rmse", "mean"), brier=("brier", "mean"), rel_ess=("ess", "mean")).reset_index()
    return out


def calibration_plot(tables: dict, path) -> Path:
    """Empirical FDR (left) and power (right) against the nominal level, per model and
    method, for the "cells" truth; one line style per variant (``tables``: {name: table})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    styles = ["-", "--", ":"]
    colors = {("cvae", "plain"): "C1", ("cvae", "importance"): "C0", ("sams_vae", "plain"): "C3",
              ("sams_vae", "importance"): "C2"}
    ordered = sorted(tables.items(), key=lambda item: item[0] != "")  # the default variant first, solid
    for (variant, table), style in zip(ordered, styles):
        t = table[table.truth == "cells"]
        for (model, method), g in t.groupby(["model", "method"]):
            if variant and method == "plain":  # the same draws as the default variant's
                continue
            color = colors.get((model, method), "C4")
            g = g.sort_values("alpha")
            label = f"{model}, {method}" + (f" ({variant})" if variant else "")
            axes[0].errorbar(g.alpha, g.empirical_fdr, yerr=g.fdr_sd, ls=style, marker="o", ms=3, color=color, label=label)
            axes[1].errorbar(g.alpha, g.tpr, yerr=g.tpr_sd, ls=style, marker="o", ms=3, color=color)
    axes[0].plot([0, 0.25], [0, 0.25], "k--", lw=0.7)
    axes[0].set_ylim(-0.15, 0.45)
    axes[0].set_xlabel("nominal posterior expected FDR")
    axes[0].set_ylabel("empirical FDR (mean over seeds)")
    axes[1].set_xlabel("nominal posterior expected FDR")
    axes[1].set_ylabel("power (TPR)")
    axes[0].legend(fontsize=6, loc="lower right")
    fig.suptitle("DE decisions on the combinatorial simulator (truth: the same cells' true group LFC)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- real data


def _top_variance(adata, n_genes):
    import scipy.sparse as sp

    x = adata.X
    norm = x.multiply(1e4 / np.maximum(np.asarray(x.sum(1)), 1)).tocsr() if sp.issparse(x) else x * (1e4 / x.sum(1, keepdims=True))
    logn = norm.copy()
    if sp.issparse(logn):
        logn.data = np.log1p(logn.data)
        mean = np.asarray(logn.mean(0)).ravel()
        var = np.asarray(logn.multiply(logn).mean(0)).ravel() - mean**2
    else:
        logn = np.log1p(logn)
        var = logn.var(0)
    keep = np.sort(np.argsort(-var)[:n_genes])
    sub = adata[:, keep].copy()
    return sub[np.asarray(sub.X.sum(1)).ravel() > 0].copy()


def welch_baseline(adata, cells_a, cells_b, delta, alpha):
    """Cell-level Welch t-test on log2(1 + counts per 1e4) of the same cells as the model's
    DE, BH-adjusted, plus their pseudobulk LFC (log2 of mean counts per 1e4 + 1)."""
    from scipy import stats

    def normalized(cells):
        x = adata.X[cells]
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        return x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4

    a, b = normalized(cells_a), normalized(cells_b)
    _, pval = stats.ttest_ind(np.log2(1 + a), np.log2(1 + b), equal_var=False)
    pval = np.nan_to_num(pval, nan=1.0)
    lfc = np.log2(a.mean(0) + 1) - np.log2(b.mean(0) + 1)
    qval = stats.false_discovery_control(pval)
    return pd.DataFrame({"pval": pval, "qval": qval, "lfc": lfc,
                         "is_de": (qval <= alpha) & (np.abs(lfc) > delta)}, index=adata.var_names)


def agreement(model_frame, base, top=20):
    from scipy import stats

    m, b = model_frame["is_de"].to_numpy(), base["is_de"].to_numpy()
    union = (m | b).sum()
    model_rank = np.lexsort((-np.abs(model_frame["lfc_mean"].to_numpy()), -model_frame["prob_de"].to_numpy()))
    base_rank = np.lexsort((-np.abs(base["lfc"].to_numpy()), base["pval"].to_numpy()))
    return {"model_de": int(m.sum()), "welch_de": int(b.sum()), "both": int((m & b).sum()),
            "jaccard": float((m & b).sum() / union) if union else float("nan"),
            f"top{top}_overlap": len(set(model_rank[:top]) & set(base_rank[:top])) / top,
            "spearman_lfc": float(stats.spearmanr(model_frame["lfc_mean"], base["lfc"]).statistic)}


def real(args, log):
    import anndata

    sets = {
        "papalexi": ("papalexi2021_eccite_lowmoi.h5ad", "perturbation", "control", [],
                     ["IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1", "SMAD4"]),
        "kang": ("kang2018_ifnb_pbmc.h5ad", "group_id", "ctrl", ["cluster_id"], ["stim"]),
    }
    rows = []
    for name, (file, key, control, covs, labels) in sets.items():
        path = Path(args.data_dir) / file
        if not path.exists():
            log(f"{path} absent: {name} skipped")
            continue
        adata = anndata.read_h5ad(path)
        if args.quick or adata.n_obs > args.max_cells:
            rng = np.random.default_rng(0)
            adata = adata[np.sort(rng.choice(adata.n_obs, min(adata.n_obs, args.max_cells), replace=False))].copy()
        adata = _top_variance(adata, args.genes)
        labels = [lab for lab in labels if (adata.obs[key].astype(str) == lab).sum() >= 20]
        for model in args.real_models:
            rows += _real_model(args, log, adata, name, model, key, control, covs, labels)
    return pd.DataFrame(rows)


def _real_model(args, log, adata, name, model, key, control, covs, labels):
    """Fit ``model`` on one real set; DE of each label, both methods, against the Welch test."""
    from pyro_perturb.evaluate.de import differential_expression
    from pyro_perturb.run import fit

    rows = []
    t0 = time.time()
    run = fit(adata, model=model, perturbation_key=key, control=control, covariate_keys=covs,
              max_epochs=args.real_epochs, n_latent=10, n_hidden=128, seed=0)
    log(f"{name}, {model}: {adata.n_obs} cells x {adata.n_vars} genes, fit {time.time() - t0:.0f}s")
    for label in labels:
        for method in METHODS:
            t0 = time.time()
            frame = differential_expression(run, adata, label, delta=args.delta, fdr=0.05, method=method,
                                            n_particles=args.particles, n_samples=args.samples,
                                            n_cells=args.real_cells, seed=0)
            # the same cells (rows of adata: the encoded data keep its order)
            base = welch_baseline(adata, frame.attrs["cells_a"], frame.attrs["cells_b"], args.delta, 0.05)
            rows.append({"dataset": name, "model": model, "perturbation": label, "method": method,
                         "cells_a": frame.attrs["n_cells_a"], "cells_b": frame.attrs["n_cells_b"],
                         "de_s": time.time() - t0, "rel_ess": frame.attrs["mean_relative_ess"],
                         **agreement(frame, base)})
        log(f"  {label} done")
    return rows


def main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)

    if args.summarize:  # rebuild the tables and the plot from the raw CSVs, no training
        tables = {}
        for raw_path in sorted(out.glob("de_calibration*_raw.csv")):
            variant = raw_path.name[len("de_calibration"):-len("_raw.csv")].lstrip("_")
            tables[variant] = summarize(pd.read_csv(raw_path))
            tables[variant].to_csv(out / f"de_calibration{'_' + variant if variant else ''}.csv", index=False)
        log(f"wrote {calibration_plot(tables, out / 'de_calibration.png')}")
        return {"tables": {k: v.to_dict("records") for k, v in tables.items()}}
    result = {"settings": {k: v for k, v in vars(args).items()}}
    suffix = f"_{args.tag}" if args.tag else ""
    if "sim" in args.tasks:
        raw = simulated(args, log)
        raw.to_csv(out / f"de_calibration{suffix}_raw.csv", index=False)
        table = summarize(raw)
        table.to_csv(out / f"de_calibration{suffix}.csv", index=False)
        result["simulated"] = table.to_dict("records")
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(table[table.truth == "cells"].round(3).to_string(index=False))
    if "real" in args.tasks:
        real_table = real(args, log)
        real_table.to_csv(out / f"de_real_agreement{suffix}.csv", index=False)
        result["real"] = real_table.to_dict("records")
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(real_table.round(3).to_string(index=False))
    result["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}"
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="minutes")
    result["seconds"] = time.time() - started
    name = "_".join(sorted(args.tasks))
    (out / f"de_{name}{suffix}.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, smaller simulation and real subsets")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--models", default="cvae,sams_vae")
    p.add_argument("--epochs", type=int, default=100, help="training epochs on the simulation")
    p.add_argument("--delta", type=float, default=0.25, help="|LFC| threshold, log2")
    p.add_argument("--particles", type=int, default=20, help="importance particles per cell and draw")
    p.add_argument("--samples", type=int, default=40, help="posterior draws")
    p.add_argument("--guide-weight", type=float, default=0.5, help="the proposal's weight on the guide (1: the guide alone)")
    p.add_argument("--scale-factor", type=float, default=2.0, help="scale multiplier of the proposal's wide component")
    p.add_argument("--tasks", default="sim", help="comma-separated: sim (simulated calibration), real "
                   "(Papalexi and Kang against a Welch t-test; skipped when the files are absent)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder of the real .h5ad files")
    p.add_argument("--summarize", action="store_true", help="only rebuild the tables and de_calibration.png "
                   "from the raw CSVs in --out")
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. a particle-count variant)")
    p.add_argument("--genes", type=int, default=1000, help="top-variance genes of the real sets")
    p.add_argument("--max-cells", type=int, default=8000, help="cells subsampled from a real set")
    p.add_argument("--real-cells", type=int, default=300, help="cells per group in real-data DE")
    p.add_argument("--real-epochs", type=int, default=30)
    p.add_argument("--real-models", default="cvae", help="comma-separated models fitted on the real sets")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "de"))
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.real_models = [m.strip() for m in args.real_models.split(",") if m.strip()]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(args.tasks) - {"sim", "real"}
    if unknown:
        p.error(f"unknown task(s) {sorted(unknown)}; choose sim, real")
    if args.quick:
        args.seeds = 1
        args.max_cells = min(args.max_cells, 3000)
    return args


if __name__ == "__main__":
    main(parse_args())
