"""Comparative VAEs benchmark: block recovery and leakage on the ``comparative`` simulator,
salient-space separation on Papalexi 2021.

Tasks (results appended row by row to CSVs in ``--out``; ``README.md`` there is rewritten
from them, so a killed run keeps what it did):

* ``sim``: the ``comparative`` simulator (1,000 controls + 4 perturbations x 250 cells, 200
  genes; 4 background + 3 salient true latents), per setting x model x seed: block MCC of
  the background block (all cells) and of the salient block (target cells), block R^2
  (linear, cross-validated) and leakage (cross-validated kNN R^2 of the other true block;
  :mod:`pyro_perturb.evaluate.blocks`) on the validation cells. Settings: ``relu``
  (leaky-ReLU decoder, fitted block sizes = true ones), ``relu_oversized`` (fitted sizes 8
  + 6: the latent sizes unknown), ``smooth`` (tanh decoder, true sizes),
  ``relu_small_salient`` (8 + 1: too few salient latents for the truth).
* ``papalexi``: Papalexi 2021 ECCITE-seq (THP-1, 25 knockouts + controls, 299 genes,
  replicate as covariate): ``co_cvae``, ``contrastive_vae``, ``mo_cvae`` and the plain ``vae``; among the
  knocked-out cells, how well each space separates the IFN-gamma pathway knockouts
  (IFNGR1, IFNGR2, JAK2, STAT1) from the other knockouts, and the knockouts from each other
  (silhouette, out-of-fold kNN balanced accuracy vs chance;
  :func:`pyro_perturb.evaluate.blocks.group_separation`).

Usage::

    python bench/comparative_benchmark.py --tasks sim papalexi --seeds 0 1 2
    python bench/comparative_benchmark.py --quick            # one seed, two settings, short
    python bench/comparative_benchmark.py --summarize        # README from the CSVs only

Keep ``OMP_NUM_THREADS=1`` and ``nice`` on shared machines.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("contrastive_vae", "mo_cvae", "co_cvae")
#: setting -> (simulator options, fitted block sizes)
SETTINGS = {
    "relu": ({"decoder": "relu"}, {"n_background": 4, "n_salient": 3}),
    "relu_oversized": ({"decoder": "relu"}, {"n_background": 8, "n_salient": 6}),
    "smooth": ({"decoder": "smooth"}, {"n_background": 4, "n_salient": 3}),
    "relu_small_salient": ({"decoder": "relu"}, {"n_background": 8, "n_salient": 1}),
}
METRICS = ("background_mcc", "salient_mcc", "background_r2", "salient_r2", "leakage_background", "leakage_salient")
IFN_PATHWAY = ("IFNGR1", "IFNGR2", "JAK2", "STAT1")


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fit_extras(run) -> dict:
    state = run.model.state_dict()
    return {k: float(state[k]) for k in ("multiplier", "last_weight", "last_dependence") if k in state}


def run_sim(args, out: Path) -> None:
    import pyro_perturb as pp
    from pyro_perturb.data.simulate import comparative
    from pyro_perturb.evaluate.blocks import block_recovery_metrics

    settings = ["relu", "relu_oversized"] if args.quick else list(SETTINGS)
    done = {(r["setting"], r["model"], r["seed"]) for r in read_rows(out / "sim.csv")}
    for setting in settings:
        sim_options, sizes = SETTINGS[setting]
        for seed in args.seeds:
            adata = comparative(seed=seed, n_genes=args.n_genes, **sim_options)
            data = pp.PerturbationData.from_anndata(adata)
            for model in MODELS:
                if (setting, model, str(seed)) in done:
                    continue
                t0 = time.perf_counter()
                run = pp.fit(data, model=model, max_epochs=args.max_epochs, batch_size=256, seed=seed,
                             device="cpu", progress=False, **sizes)
                metrics = block_recovery_metrics(run.latents(data), data, seed=seed)["val"]
                row = {"setting": setting, "model": model, "seed": seed,
                       **{k: round(metrics.get(k, float("nan")), 4) for k in METRICS},
                       "steps": run.history[-1]["step"], "seconds": round(time.perf_counter() - t0, 1),
                       **{k: round(v, 4) for k, v in _fit_extras(run).items()}}
                append_row(out / "sim.csv", row)
                print(row, flush=True)


def run_papalexi(args, out: Path) -> None:
    import anndata as ad

    import pyro_perturb as pp
    from pyro_perturb.evaluate.blocks import group_separation

    path = Path(args.data_dir) / "papalexi2021_eccite_lowmoi.h5ad"
    if not path.exists():
        print(f"skipping papalexi: {path} not found", file=sys.stderr)
        return
    adata = ad.read_h5ad(path)
    data = pp.PerturbationData.from_anndata(adata, covariate_keys=["bio_rep"], seed=0)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    ko = labels != "control"
    ifn = np.isin(labels, IFN_PATHWAY)
    fits = {
        "co_cvae": dict(n_background=10, n_salient=5),
        "contrastive_vae": dict(n_background=10, n_salient=5),
        "mo_cvae": dict(n_background=10, n_salient=5),
        "vae": dict(n_latent=15),
    }
    done = {(r["model"], r["seed"]) for r in read_rows(out / "papalexi.csv")}
    for seed, (model, hp) in ((seed, fit) for seed in args.seeds for fit in fits.items()):
        if (model, str(seed)) in done:
            continue
        t0 = time.perf_counter()
        run = pp.fit(data, model=model, max_epochs=args.papalexi_epochs, batch_size=256, seed=seed, device="cpu",
                     progress=False, **hp)
        seconds = time.perf_counter() - t0
        latents = run.latents(data)
        spaces = {"latent": latents["X_latent"]} if model == "vae" else {
            "salient": latents["X_salient"], "background": latents["X_background"]}
        for space, z in spaces.items():
            row = {"model": model, "seed": seed, "space": space, "seconds": round(seconds, 1),
                   "steps": run.history[-1]["step"]}
            tasks = {
                "ifn_vs_other_ko": (z[ko], np.where(ifn[ko], "ifn", "other")),
                "ko_identity": (z[ko], labels[ko]),
                "ifn_vs_control": (z[ifn | ~ko], np.where(ifn[ifn | ~ko], "ifn", "control")),
            }
            for task, (x, groups) in tasks.items():
                sep = group_separation(x, groups, seed=0)
                row[f"{task}_silhouette"] = round(sep["silhouette"], 4)
                row[f"{task}_knn_bacc"] = round(sep["knn_balanced_accuracy"], 4)
                row[f"{task}_chance"] = round(sep["chance"], 4)
            row.update({k: round(v, 4) for k, v in _fit_extras(run).items()})
            append_row(out / "papalexi.csv", row)
            print(row, flush=True)


def _mean_sd(values: list[float]) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")


def plot(out: Path) -> None:
    """``comparative.png``: block MCC and leakage per setting and model (mean, sd bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(out / "sim.csv")
    if not rows:
        return
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    panels = ("background_mcc", "salient_mcc", "leakage_background", "leakage_salient")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), sharey=True)
    width = 0.8 / len(MODELS)
    for ax, metric in zip(axes, panels):
        for j, model in enumerate(MODELS):
            vals = [[float(r[metric]) for r in rows if r["setting"] == s and r["model"] == model] for s in settings]
            means = [np.mean(v) if v else np.nan for v in vals]
            sds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax.bar(np.arange(len(settings)) + (j - 1) * width, means, width, yerr=sds, label=model, capsize=2)
        ax.set_xticks(np.arange(len(settings)), settings, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "comparative.png", dpi=120)
    plt.close(fig)


def summarize(out: Path, command: str) -> str:
    lines = [
        "# Comparative VAEs: block recovery, leakage, salient-space separation",
        "",
        f"Tables generated by `bench/comparative_benchmark.py` on {datetime.date.today()} ({platform.machine()}, "
        f"2 shared CPU cores, `OMP_NUM_THREADS=1`, `nice`; wall-clock figures vary with the load) from `sim.csv` "
        f"and `papalexi.csv`: `python bench/comparative_benchmark.py --tasks sim papalexi --seeds 0 1 2 "
        f"--data-dir ../shared/data` (this file rewritten by `{command}`). Figure: `comparative.png`.",
        "",
    ]
    rows = read_rows(out / "sim.csv")
    if rows:
        lines += ["## Simulator (`comparative`, validation cells, mean ± sd over seeds)", "",
                  "| setting | model | seeds | " + " | ".join(METRICS) + " | steps | s/fit |",
                  "|" + "---|" * (len(METRICS) + 5)]
        for setting in SETTINGS:
            for model in MODELS:
                sel = [r for r in rows if r["setting"] == setting and r["model"] == model]
                if not sel:
                    continue
                cells = [_mean_sd([float(r[k]) for r in sel]) for k in METRICS]
                lines.append(f"| {setting} | {model} | {len(sel)} | " + " | ".join(cells)
                             + f" | {np.mean([float(r['steps']) for r in sel]):.0f}"
                             + f" | {np.mean([float(r['seconds']) for r in sel]):.0f} |")
        lines.append("")
    rows = read_rows(out / "papalexi.csv")
    if rows:
        tasks = ("ifn_vs_other_ko", "ko_identity", "ifn_vs_control")
        seeds = sorted({r["seed"] for r in rows}, key=int)
        lines += [f"## Papalexi 2021 (seeds {', '.join(seeds)}: mean ± sd; kNN balanced accuracy out of fold, "
                  "chance in brackets)", "",
                  "Cells: the knocked-out cells (`ifn_vs_other_ko`: IFNGR1/IFNGR2/JAK2/STAT1 vs the 21 other "
                  "knockouts; `ko_identity`: the 25 knockouts), and the IFN-pathway knockouts with the controls "
                  "(`ifn_vs_control`; in a salient space controls are 0 by construction, so that column is "
                  "trivially high there).", "",
                  "| model | space | seeds | " + " | ".join(f"{t} silhouette | {t} kNN bacc" for t in tasks)
                  + " | s/fit |",
                  "|" + "---|" * (2 * len(tasks) + 4)]
        groups = {}
        for r in rows:
            groups.setdefault((r["model"], r["space"]), []).append(r)
        for (model, space), sel in groups.items():
            cells = [f"{_mean_sd([float(r[f'{t}_silhouette']) for r in sel])} | "
                     f"{_mean_sd([float(r[f'{t}_knn_bacc']) for r in sel])} ({float(sel[0][f'{t}_chance']):.2f})"
                     for t in tasks]
            lines.append(f"| {model} | {space} | {len(sel)} | " + " | ".join(cells)
                         + f" | {np.mean([float(r['seconds']) for r in sel]):.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sim", "papalexi"], choices=["sim", "papalexi"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-genes", type=int, default=200)
    p.add_argument("--max-epochs", type=int, default=150, help="simulator fits (7 steps per epoch)")
    p.add_argument("--papalexi-epochs", type=int, default=25, help="Papalexi fits (~52 steps per epoch)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "comparative"))
    p.add_argument("--quick", action="store_true", help="one seed, two settings, 40 epochs; no Papalexi")
    p.add_argument("--summarize", action="store_true", help="only rewrite README.md from the CSVs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.seeds, args.max_epochs, args.tasks = args.seeds[:1], min(args.max_epochs, 40), ["sim"]
    command = "python bench/comparative_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.summarize:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        if "sim" in args.tasks:
            run_sim(args, out)
        if "papalexi" in args.tasks:
            run_papalexi(args, out)
    plot(out)
    text = summarize(out, command.strip())
    notes = out / "findings.txt"  # hand-written findings (Markdown), appended to every rewrite
    if notes.exists():
        text += "\n" + notes.read_text()
    (out / "README.md").write_text(text)
    print(f"wrote {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
