"""FCR benchmark: factorised causal representations of responses across cell contexts.

Three tasks, each model trained with its *registered defaults* (``pp.fit`` without tuning),
results appended row by row to CSV files in ``--out`` (a killed run keeps what it did) and
summarised in ``fcr_benchmark.md``:

* ``sim``: the ``factorized`` simulator (4 cell lines x 6 drugs, 3 held-out (line, drug)
  pairs as test), per seed: held-out group-mean R^2 (all genes, top-20 DE genes; direct and
  control-anchored) for each model and the plain additive baseline; for FCR also block
  recovery (linear R^2 of each true block from each inferred block) and dHSIC between the
  inferred blocks (and, for reference, between the true blocks).
* ``kang``: Kang 2018 IFN-beta PBMCs; for each cell type, its stimulated cells are the test
  split, the rest train/val; group-mean R^2 of the held-out group for each model and the
  baseline "control mean of that cell type + average stimulation shift of the others".
* ``throughput``: training cells/s end to end (epochs incl. validation) at the defaults,
  FCR and the conditional VAE in the same process (the VAE is the in-process reference).

Usage::

    python bench/fcr_benchmark.py --tasks sim kang throughput --seeds 0 1 2
    python bench/fcr_benchmark.py --summarize          # tables from the CSVs only

Keep ``OMP_NUM_THREADS=1`` on shared machines.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KANG = ROOT.parent / "shared" / "data" / "kang2018_ifnb_pbmc.h5ad"
KANG_TYPES = ["B cells", "CD14+ Monocytes", "CD4 T cells", "CD8 T cells", "FCGR3A+ Monocytes"]


def append_row(path: Path, row: dict) -> None:
    """Append one row; the header is the union of all rows' fields (file rewritten when a
    row brings new fields, e.g. FCR's block-recovery columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(path)
    fields = list(rows[0].keys()) if rows else []
    if rows and set(row) <= set(fields):
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, restval="").writerow(row)
        return
    fields += [k for k in row if k not in fields]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for r in rows + [row]:
            w.writerow(r)
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def fit(adata, model, seed, options, overrides):
    import pyro_perturb as pp

    t0 = time.perf_counter()
    run = pp.fit(adata, model=model, seed=seed, device="cpu", **options, **overrides.get(model, {}))
    return run, time.perf_counter() - t0


def group_row(run, n_samples, seed):
    from pyro_perturb.evaluate.groups import group_scores

    per_split, _, _ = group_scores(run, run.data, seed=seed, n_samples=n_samples, splits=("test",))
    t = per_split["test"]
    keys = ["group_r2", "group_r2_top20", "group_r2_anchored", "group_r2_top20_anchored",
            "group_r2_baseline", "group_r2_top20_baseline"]
    return {k: round(float(t.get(k, float("nan"))), 4) for k in keys} | {"n_groups": t["n_groups"]}, t["groups"]


# ----------------------------------------------------------------------------- tasks
def task_sim(args, overrides):
    import pyro_perturb as pp
    from pyro_perturb.evaluate.metrics import dhsic, linear_r2

    path = Path(args.out) / "fcr_sim.csv"
    done = {(r["seed"], r["model"]) for r in read_rows(path)}
    for seed in args.seeds:
        adata = pp.simulate.factorized(seed=seed)
        if (str(seed), "truth") not in done:
            # reference: dHSIC of the *true* blocks, marginal and within (line, treatment) groups
            blocks = [adata.obsm[k] for k in ("z_x_true", "z_t_true", "z_tx_true")]
            stat, p = dhsic(blocks, n_permutations=200, seed=seed)
            row = {"seed": seed, "model": "truth", "dhsic": round(stat, 5), "dhsic_p": round(p, 4),
                   "dhsic_within_groups": round(_within_dhsic(adata, blocks), 5)}
            append_row(path, row)
        for model in args.models:
            name = model + (f"[{args.tag}]" if args.tag else "")
            if (str(seed), name) in done:
                continue
            run, secs = fit(adata, model, seed, {"covariate_keys": ["cell_line"]}, overrides)
            row = {"seed": seed, "model": name, "epochs": len(run.history), "fit_s": round(secs, 1)}
            scores, groups = group_row(run, args.n_samples, seed)
            row.update(scores)
            if model == "fcr":
                lat = run.latents(run.data)
                for tb in ("z_x", "z_t", "z_tx"):
                    for ib in ("X_zx", "X_zt", "X_ztx"):
                        row[f"r2_{tb}_from_{ib[2:]}"] = round(linear_r2(adata.obsm[f"{tb}_true"], lat[ib]), 3)
                stat, p = dhsic([lat["X_zx"], lat["X_zt"], lat["X_ztx"]], n_permutations=200, seed=seed)
                row["dhsic"], row["dhsic_p"] = round(stat, 5), round(p, 4)
                stat, p = dhsic([adata.obsm[k] for k in ("z_x_true", "z_t_true", "z_tx_true")], n_permutations=200, seed=seed)
                row["dhsic_true"], row["dhsic_true_p"] = round(stat, 5), round(p, 4)
                # within (cell line, treatment) groups: the model's conditional independence
                row["dhsic_within_groups"] = round(_within_dhsic(adata, [lat["X_zx"], lat["X_zt"], lat["X_ztx"]]), 5)
            row["per_group_r2"] = json.dumps({g: round(v["r2"], 3) for g, v in groups.items()})
            row["per_group_r2_top20"] = json.dumps({g: round(v["r2_top20"], 3) for g, v in groups.items()})
            append_row(path, row)
            print(json.dumps(row), flush=True)


def _within_dhsic(adata, blocks) -> float:
    """Mean dHSIC statistic of the blocks within each (cell line, perturbation) group."""
    from pyro_perturb.evaluate.metrics import dhsic

    labels = (adata.obs["cell_line"].astype(str) + "|" + adata.obs["perturbation"].astype(str)).to_numpy()
    stats = [dhsic([b[labels == g] for b in blocks], n_permutations=0)[0] for g in np.unique(labels)]
    return float(np.mean(stats))


def kang_split(adata, heldout, seed):
    sys.path.insert(0, str(ROOT / "examples"))
    from fcr_cell_context import kang_split as split

    return split(adata, heldout, seed=seed)


def task_kang(args, overrides):
    import anndata

    if not KANG.exists():
        print(f"skip kang: {KANG} not found")
        return
    raw = anndata.read_h5ad(KANG)
    options = {"perturbation_key": "group_id", "control": "ctrl", "covariate_keys": ["cluster_id"]}
    path = Path(args.out) / "fcr_kang.csv"
    done = {(r["seed"], r["heldout"], r["model"]) for r in read_rows(path)}
    for seed in args.kang_seeds:
        for cell_type in args.kang_types:
            adata = kang_split(raw, cell_type, seed)
            for model in args.models:
                name = model + (f"[{args.tag}]" if args.tag else "")
                if (str(seed), cell_type, name) in done:
                    continue
                run, secs = fit(adata, model, seed, options, overrides)
                row = {"seed": seed, "heldout": cell_type, "model": name, "epochs": len(run.history), "fit_s": round(secs, 1)}
                scores, _ = group_row(run, args.n_samples, seed)
                row.update(scores)
                append_row(path, row)
                print(json.dumps(row), flush=True)


def task_throughput(args, overrides):
    import anndata
    import pyro_perturb as pp

    path = Path(args.out) / "fcr_throughput.csv"
    datasets = [("factorized", pp.simulate.factorized(seed=0), {"covariate_keys": ["cell_line"]})]
    if KANG.exists():
        datasets.append(("kang", kang_split(anndata.read_h5ad(KANG), "CD14+ Monocytes", 0),
                         {"perturbation_key": "group_id", "control": "ctrl", "covariate_keys": ["cluster_id"]}))
    for name, adata, options in datasets:
        for model in ("cvae", "fcr"):
            run = pp.fit(adata, model=model, seed=0, device="cpu", max_epochs=args.throughput_epochs + 1,
                         early_stopping_patience=None, **options)
            hist = run.history[1:]  # first epoch: warm-up
            n_train = len(run.data.indices("train"))
            secs = float(np.median([h["seconds"] for h in hist]))
            row = {"data": name, "model": model, "batch_size": run.train_config.batch_size,
                   "num_particles": run.train_config.num_particles, "n_train": n_train,
                   "sec_per_epoch": round(secs, 3), "cells_per_s": round(n_train / secs, 1)}
            append_row(path, row)
            print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- summary
def _mean_sd(vals, digits: int = 3):
    vals = [float(v) for v in vals if v not in ("", "nan", None) and np.isfinite(float(v))]
    if not vals:
        return "n/a"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}" if len(vals) > 1 else f"{vals[0]:.{digits}f}"


def _paired(rows, model_a: str, model_b: str, key: str, unit: str):
    """Paired differences a - b of ``key`` (a group-mean R^2 column) over the units both
    models have: ``unit="seed"`` (one value per run), ``"group"`` (the runs' per-group
    JSON ``per_group_<key[6:]>``, i.e. each held-out group of each seed) or ``"run"`` (Kang:
    one value per (seed, held-out type), model ``"baseline"`` = the baseline column).
    Returns the list."""
    by = {}
    for r in rows:
        if unit == "seed":
            by.setdefault(r["model"], {})[r["seed"]] = _f(r[key])
        elif unit == "group":
            col = "per_group_" + key[len("group_"):]
            if r.get(col):
                for g, v in json.loads(r[col]).items():
                    by.setdefault(r["model"], {})[(r["seed"], g)] = _f(v)
        if unit == "run":  # Kang: one value per (seed, held-out type); "baseline" = its baseline column
            by.setdefault(r["model"], {})[(r["seed"], r["heldout"])] = _f(r[key])
            by.setdefault("baseline", {})[(r["seed"], r["heldout"])] = _f(r[key + "_baseline"])
    a, b = by.get(model_a, {}), by.get(model_b, {})
    return [a[k] - b[k] for k in sorted(set(a) & set(b)) if np.isfinite(a[k] - b[k])]


def _diff_cell(diffs) -> str:
    if not diffs:
        return "n/a"
    sd = f" ± {np.std(diffs):.3f}" if len(diffs) > 1 else ""
    return f"{np.mean(diffs):+.3f}{sd} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def summarize(out: Path) -> str:
    lines = ["# FCR benchmark", "", "Generated by `bench/fcr_benchmark.py`; numbers are means ± sd over runs.", "",
             "Protocol of the committed results (reduced to fit a shared 2-core machine): simulator 3 seeds",
             "x {fcr, cvae, cpa_vae} at registered defaults except cpa_vae capped at `max_epochs=100` (its",
             "default 300; it early-stopped at 50-75 epochs anyway); Kang 2018 seeds 0-2 per held-out cell",
             "type for fcr and cvae, cpa_vae with the same cap and the seeds listed in fcr_kang.csv;",
             "ablations: `fcr[no-reg]` = all three regulariser weights 0, `fcr[heads5]` =",
             "`n_interaction_heads=5`. Why FCR does not win on all genes: [fcr_diagnosis.md](fcr_diagnosis.md).",
             "Each held-out group is one (covariate, treatment) group with",
             "more than 30 cells; R² anchored = the model's predicted response added to the observed control",
             "mean of that covariate; baseline = control mean of that covariate + mean shift of the",
             "treatment in the other covariates (log-normalised space, training cells).", ""]
    sim = read_rows(out / "fcr_sim.csv")
    if sim:
        seeds = sorted({r["seed"] for r in sim})
        lines += [f"## Factorized simulator: held-out (cell line, drug) pairs (seeds {', '.join(seeds)}; 3 held-out groups each)", "",
                  "| model | R² all genes | R² top-20 DE | R² anchored | R² top-20 anchored | epochs | fit s |", "|---|---|---|---|---|---|---|"]
        truth = [r for r in sim if r["model"] == "truth"]
        sim = [r for r in sim if r["model"] != "truth"]
        for model in dict.fromkeys(r["model"] for r in sim):
            rs = [r for r in sim if r["model"] == model]
            lines.append(f"| {model} | {_mean_sd([r['group_r2'] for r in rs])} | {_mean_sd([r['group_r2_top20'] for r in rs])} | "
                         f"{_mean_sd([r['group_r2_anchored'] for r in rs])} | {_mean_sd([r['group_r2_top20_anchored'] for r in rs])} | "
                         f"{_mean_sd([r['epochs'] for r in rs], 0)} | {_mean_sd([r['fit_s'] for r in rs], 0)} |")
        base = {r["seed"]: r for r in sim}.values()
        lines.append(f"| additive baseline | {_mean_sd([r['group_r2_baseline'] for r in base])} | {_mean_sd([r['group_r2_top20_baseline'] for r in base])} | | | | |")
        others = [m for m in dict.fromkeys(r["model"] for r in sim) if m != "fcr"]
        if "fcr" in {r["model"] for r in sim} and others:
            lines += ["", "Paired differences, FCR minus the other model on the same data: mean ± sd (FCR better in",
                      "k/n); per seed = that seed's mean over its held-out groups, per group = each held-out",
                      "group of each seed (top-20 per group only for runs that recorded it):", "",
                      "| FCR minus | R² all genes, per seed | per group | R² top-20 DE, per seed | per group |", "|---|---|---|---|---|"]
            for m in others:
                lines.append(f"| {m} | {_diff_cell(_paired(sim, 'fcr', m, 'group_r2', 'seed'))} | "
                             f"{_diff_cell(_paired(sim, 'fcr', m, 'group_r2', 'group'))} | "
                             f"{_diff_cell(_paired(sim, 'fcr', m, 'group_r2_top20', 'seed'))} | "
                             f"{_diff_cell(_paired(sim, 'fcr', m, 'group_r2_top20', 'group'))} |")
        fcr = [r for r in sim if r["model"] == "fcr"]  # the registered defaults
        if fcr:
            lines += ["", "FCR block recovery: linear R² of each true block (rows) from each inferred block (columns):", "",
                      "| true \\ inferred | z_x | z_t | z_tx |", "|---|---|---|---|"]
            for tb in ("z_x", "z_t", "z_tx"):
                lines.append(f"| {tb} | " + " | ".join(_mean_sd([r[f'r2_{tb}_from_{ib}'] for r in fcr]) for ib in ("zx", "zt", "ztx")) + " |")
            lines += ["", "| dHSIC (3 blocks) | FCR's inferred blocks | true blocks |", "|---|---|---|",
                      f"| statistic, all cells | {_mean_sd([r['dhsic'] for r in fcr], 4)} | {_mean_sd([r['dhsic'] for r in truth] or [r['dhsic_true'] for r in fcr], 4)} |",
                      f"| permutation p, all cells | {_mean_sd([r['dhsic_p'] for r in fcr])} | {_mean_sd([r['dhsic_p'] for r in truth] or [r['dhsic_true_p'] for r in fcr])} |",
                      f"| mean statistic within (line, treatment) groups | {_mean_sd([r['dhsic_within_groups'] for r in fcr], 4)} | {_mean_sd([r['dhsic_within_groups'] for r in truth], 4)} |"]
    kang = read_rows(out / "fcr_kang.csv")
    if kang:
        lines += ["", "## Kang 2018 IFN-beta: stimulated cells of one cell type held out", "",
                  "Group-mean R² of the held-out (cell type, stim) group; columns: all genes / top-20 DE genes.", "",
                  "| held-out type | " + " | ".join(dict.fromkeys(r["model"] for r in kang)) + " | baseline |",
                  "|---|" + "---|" * (len(dict.fromkeys(r["model"] for r in kang)) + 1)]
        models = list(dict.fromkeys(r["model"] for r in kang))
        for ct in dict.fromkeys(r["heldout"] for r in kang):
            cells = []
            for m in models:
                rs = [r for r in kang if r["heldout"] == ct and r["model"] == m]
                cells.append(f"{_mean_sd([r['group_r2'] for r in rs])} / {_mean_sd([r['group_r2_top20'] for r in rs])}")
            b = [r for r in kang if r["heldout"] == ct]
            cells.append(f"{_mean_sd([b[0]['group_r2_baseline']])} / {_mean_sd([b[0]['group_r2_top20_baseline']])}")
            lines.append(f"| {ct} | " + " | ".join(cells) + " |")
        cells = []
        for m in models:
            rs = [r for r in kang if r["model"] == m]
            cells.append(f"{_mean_sd([r['group_r2'] for r in rs])} / {_mean_sd([r['group_r2_top20'] for r in rs])}")
        first = {(r["seed"], r["heldout"]): r for r in kang}.values()
        cells.append(f"{_mean_sd([r['group_r2_baseline'] for r in first])} / {_mean_sd([r['group_r2_top20_baseline'] for r in first])}")
        lines.append("| **mean** | " + " | ".join(cells) + " |")
        lines += ["", "Paired differences on Kang, FCR minus the other over the (seed, held-out type) runs both have:",
                  "mean ± sd (FCR better in k/n):", "", "| FCR minus | R² all genes | R² top-20 DE |", "|---|---|---|"]
        for m in [m for m in models if m != "fcr"] + ["baseline"]:
            lines.append(f"| {m} | {_diff_cell(_paired(kang, 'fcr', m, 'group_r2', 'run'))} | "
                         f"{_diff_cell(_paired(kang, 'fcr', m, 'group_r2_top20', 'run'))} |")
        lines += ["", "Control-anchored variant (model response added to the observed control mean of the cell type):", "",
                  "| model | R² anchored | R² top-20 anchored |", "|---|---|---|"]
        for m in models:
            rs = [r for r in kang if r["model"] == m]
            lines.append(f"| {m} | {_mean_sd([r['group_r2_anchored'] for r in rs])} | {_mean_sd([r['group_r2_top20_anchored'] for r in rs])} |")
    thr = read_rows(out / "fcr_throughput.csv")
    if thr:
        lines += ["", "## Throughput at the registered defaults (CPU, 1 thread, shared machine)", "",
                  "Median seconds per epoch over 5 epochs after one warm-up epoch, end to end (validation",
                  "included); the conditional VAE is the in-process reference (machine load varies).", "",
                  "| data | model | batch | particles | train cells | s / epoch | cells / s | vs cvae |", "|---|---|---|---|---|---|---|---|"]
        ref = {r["data"]: float(r["cells_per_s"]) for r in thr if r["model"] == "cvae"}
        for r in thr:
            ratio = float(r["cells_per_s"]) / ref[r["data"]] if r["data"] in ref else float("nan")
            lines.append(f"| {r['data']} | {r['model']} | {r['batch_size']} | {r['num_particles']} | {r['n_train']} | "
                         f"{r['sec_per_epoch']} | {r['cells_per_s']} | {ratio:.2f} |")
    text = "\n".join(lines) + "\n"
    if sim or kang:
        plot(sim, kang, out / "fcr_benchmark.png")
        text += "\n![held-out group R²](fcr_benchmark.png)\n\n(Dots: runs; bars: means; y axis clipped at R² = -1.)\n"
    (out / "fcr_benchmark.md").write_text(text)
    return text


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot(sim, kang, path: Path) -> None:
    """Held-out group R^2 (all genes, top-20 DE) per model and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(rows, title) for rows, title in [(sim, "factorized simulator (per seed)"), (kang, "Kang 2018 (per held-out type)")] if rows]
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for i, (rows, title) in enumerate(panels):
        models = list(dict.fromkeys(r["model"] for r in rows))
        for j, metric in enumerate(["group_r2", "group_r2_top20"]):
            ax = axes[i, j]
            series = {m: [_f(r[metric]) for r in rows if r["model"] == m] for m in models}
            first = list({(r.get("seed"), r.get("heldout")): r for r in rows}.values())
            series["baseline"] = [_f(r[metric + "_baseline"]) for r in first]
            for k, (name, vals) in enumerate(series.items()):
                ax.scatter(np.full(len(vals), k) + np.linspace(-0.15, 0.15, len(vals)), vals, s=18)
                ax.hlines(np.nanmean(vals), k - 0.3, k + 0.3, color="k")
            ax.set_xticks(range(len(series)), list(series), fontsize=8)
            ax.set_title(f"{title}: {'all genes' if j == 0 else 'top-20 DE genes'}", fontsize=9)
            ax.set_ylabel("held-out group R²")
            lo = np.nanmin([np.nanmin(v) for v in series.values() if len(v)])
            ax.set_ylim(max(lo, -1.0) - 0.05, 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="FCR benchmark")
    p.add_argument("--tasks", nargs="+", default=["sim", "kang", "throughput"], choices=["sim", "kang", "throughput"])
    p.add_argument("--models", nargs="+", default=["fcr", "cvae", "cpa_vae"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kang-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kang-types", nargs="+", default=KANG_TYPES)
    p.add_argument("--n-samples", type=int, default=1000, help="posterior-predictive cells per group")
    p.add_argument("--max-epochs", type=int, default=None, help="cap every model's max_epochs (reduced runs; say so)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE", help="override one model's setting")
    p.add_argument("--tag", default="", help="suffix of the model name in the CSVs (ablations: --tag no-reg)")
    p.add_argument("--throughput-epochs", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--summarize", action="store_true", help="only rebuild the markdown from the CSVs")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        from pyro_perturb.cli import _parse_value

        overrides: dict = {}
        for item in args.set:
            key, value = item.split("=", 1)
            model, key = key.split(".", 1)
            overrides.setdefault(model, {})[key] = _parse_value(value)
        if args.max_epochs:
            for m in args.models:
                overrides.setdefault(m, {}).setdefault("max_epochs", args.max_epochs)
        for task in args.tasks:
            {"sim": task_sim, "kang": task_kang, "throughput": task_throughput}[task](args, overrides)
    print(summarize(out))


if __name__ == "__main__":
    main()
