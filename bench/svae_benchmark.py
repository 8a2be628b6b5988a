"""sVAE-family benchmark on the sparse-mechanism-shift simulator (docs/models.md, "sVAE family").

Protocol (the paper's sizes by default): for each seed, ``sparse_shift(seed=seed)`` with 15
latents, 100 perturbations x 250 cells, 250 control cells, 100 genes, 20 perturbations
held out (their cells are the "test" split); each model is trained with its registry
defaults (``fit`` with no tuning, the user's path) plus any ``--set`` overrides, then:

* latent recovery on the validation cells: MCC (Pearson, Spearman) and linear R^2;
* target identification (precision / recall / F1) over the 80 training perturbations,
  after the Hungarian matching found on the training cells (masks > 0.5; top-k |shift|
  for iVAE, top-k |empirical latent shift| for the VAE and beta-VAE);
* OOD transfer (:mod:`pyro_perturb.infer.transfer`): encoder, decoder and dispersion
  frozen, the held-out perturbations' shift/mask re-fitted on half of their cells,
  held-out ELBO and IWELBO (100 particles) on the other half.

Each (model, seed) result is written to ``OUT/svae_runs/MODEL_seedS.json`` as soon as it is
done (a re-run skips finished ones); the table of means and standard deviations over
seeds goes to ``OUT/svae_benchmark.md`` and ``OUT/svae_benchmark.csv``.

Usage::

    python bench/svae_benchmark.py                        # full protocol: 5 models x 5 seeds
    python bench/svae_benchmark.py --seeds 0 1 2 --set max_epochs=40 --jobs 2
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ["svae_plus", "svae", "ivae", "vae", "beta_vae"]
METRICS = [
    ("mcc_pearson", "MCC (Pearson)"),
    ("mcc_spearman", "MCC (Spearman)"),
    ("linear_r2", "linear R^2"),
    ("target_f1", "target F1"),
    ("target_precision", "target precision"),
    ("target_recall", "target recall"),
    ("transfer_iwelbo", "held-out IWELBO"),
    ("transfer_elbo", "held-out ELBO"),
    ("before_iwelbo", "held-out IWELBO before transfer"),
    ("epochs", "train epochs"),
    ("seconds", "train s"),
]


def run_one(model: str, seed: int, sizes: dict, settings: dict, transfer_kwargs: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from pyro_perturb.data import simulate
    from pyro_perturb.evaluate.recovery import recovery_metrics
    from pyro_perturb.infer.transfer import transfer_run
    from pyro_perturb.run import fit

    adata = simulate.sparse_shift(seed=seed, **sizes)
    t0 = time.perf_counter()
    run = fit(adata, model=model, seed=seed, **settings)
    seconds = time.perf_counter() - t0
    rec = recovery_metrics(run, run.data, seed=seed)
    result = {"model": model, "seed": seed, "epochs": len(run.history), "seconds": seconds}
    result.update(rec["val"])
    result["mcc_pearson_train"] = rec["train"]["mcc_pearson"]
    t0 = time.perf_counter()
    result.update(transfer_run(run, run.data, seed=seed, **transfer_kwargs))
    result["epochs"] = len(run.history)  # training epochs (the transfer's are transfer_epochs)
    result["transfer_seconds"] = time.perf_counter() - t0
    result["settings"] = settings
    result["sizes"] = sizes
    return result


def _job(args):
    model, seed, sizes, settings, transfer_kwargs, path = args
    result = run_one(model, seed, sizes, settings, transfer_kwargs)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    print(
        f"{model} seed {seed}: MCC {result['mcc_pearson']:.3f}, target F1 {result['target_f1']:.3f}, "
        f"held-out IWELBO {result['transfer_iwelbo']:.2f} ({result['epochs']} epochs, {result['seconds']:.0f} s)",
        flush=True,
    )
    return result


def summarise(results: list[dict], models: list[str]) -> tuple[str, str]:
    """Markdown and CSV tables: mean +- sd over seeds for each model."""
    header = ["model", "n seeds"] + [label for _, label in METRICS]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv = [",".join(["model", "n_seeds"] + [f"{k}_mean,{k}_sd" for k, _ in METRICS])]
    for model in models:
        rows = [r for r in results if r["model"] == model]
        if not rows:
            continue
        cells, csv_cells = [model, str(len(rows))], [model, str(len(rows))]
        for key, _ in METRICS:
            v = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
            mean = float(v.mean()) if v.size else float("nan")
            sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
            fmt = "{:.0f}" if key in ("epochs", "seconds") else ("{:.2f}" if "elbo" in key else "{:.3f}")
            cells.append(fmt.format(mean) + (" ± " + fmt.format(sd) if v.size > 1 else ""))
            csv_cells += [f"{mean:.6g}", f"{sd:.6g}"]
        md.append("| " + " | ".join(cells) + " |")
        csv.append(",".join(csv_cells))
    # paired by seed: the held-out IWELBO varies more between simulated datasets than
    # between models, so differences to the VAE on the same seed are the sharper contrast
    vae = {r["seed"]: r["transfer_iwelbo"] for r in results if r["model"] == "vae"}
    if vae:
        md += ["", "Held-out IWELBO minus the VAE's on the same seed (paired; > 0: better than the VAE):", "",
               "| model | mean ± sd | per seed |", "|---|---|---|"]
        for model in models:
            d = [(r["seed"], r["transfer_iwelbo"] - vae[r["seed"]]) for r in results if r["model"] == model and r["seed"] in vae]
            if d and model != "vae":
                v = np.array([x for _, x in sorted(d)])
                md.append(f"| {model} | {v.mean():+.2f} ± {v.std(ddof=1) if v.size > 1 else float('nan'):.2f} | "
                          + ", ".join(f"{x:+.2f}" for x in v) + " |")
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


def _parse_sets(items):
    out = {}
    for item in items or []:
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="fit setting override (repeatable)")
    p.add_argument("--size", action="append", metavar="KEY=VALUE", help="simulator size override (repeatable)")
    p.add_argument("--transfer-epochs", type=int, default=50)
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--num-particles", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (one thread each)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    out = Path(args.out)
    (out / "svae_runs").mkdir(parents=True, exist_ok=True)
    settings, sizes = _parse_sets(args.set), _parse_sets(args.size)
    transfer_kwargs = {"max_epochs": args.transfer_epochs, "lr": args.transfer_lr, "num_particles": args.num_particles}
    jobs, results = [], []
    for seed in args.seeds:
        for model in args.models:
            path = out / "svae_runs" / f"{model}_seed{seed}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
                print(f"{model} seed {seed}: done before ({path})")
            else:
                jobs.append((model, seed, sizes, settings, transfer_kwargs, path))
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results += pool.map(_job, jobs, chunksize=1)
    else:
        results += [_job(j) for j in jobs]

    md, csv = summarise(results, args.models)
    note = (
        f"sparse_shift sizes: {sizes or 'paper defaults'}; fit overrides: {settings or 'none (registry defaults)'}; "
        f"seeds {args.seeds}; transfer {transfer_kwargs}.\n\n"
    )
    (out / "svae_benchmark.md").write_text("# sVAE family benchmark\n\n" + note + md)
    (out / "svae_benchmark.csv").write_text(csv)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
