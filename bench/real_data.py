"""Models beside honest baselines on real and realistic data: the four settings of the
real-data evaluation, several seeds, one JSON per (setting, model, seed) and a Markdown table.

Settings (``--settings``):

* ``papalexi``: Papalexi et al. 2021 (ECCITE-seq knockouts, 25 singles), a random 64/16/20
  cell split per seed: held-out cells of perturbations seen in training (group ``seen``).
  The baseline to beat is ``empirical`` (the training cells' own effect).
* ``shallow_sim``: the combinatorial simulator at real screens' depth
  (``depth="shallow"``: ~150 UMIs, ~100 cells per condition, small effects), half the
  doubles held out (group ``unseen``): ``additive`` and ``no_change`` to beat.
* ``mcfaline``: McFaline-Figueroa et al. (3 glioma lines x 9 CRISPRi knockdowns, ~132 UMIs):
  each seed holds out 9 (line, knockdown) pairs, one per knockdown (line ``(k + seed) mod
  3``), so 3 seeds hold out all 27 pairs once; ``covariate_additive`` (the line's control
  + the knockdown's mean shift in the other lines) to beat.
* ``kang``: Kang et al. 2018 (IFN-beta, 5 PBMC types): seed ``s`` holds out the stimulated
  cells of cell type ``s`` (sorted names); ``covariate_additive`` to beat.

Every setting also holds out a share of control cells (the evaluation's honest protocol),
and every run is evaluated with ``Run.evaluate`` exactly as a user would (the comparison
block of ``metrics.json``), with the model's effects at the data's own depth. The table
reports mean +- sd over seeds per predictor and the number of seeds the model beats the
best baseline, plus the noise ceiling (split-half Pearson delta of the held-out data).

    python bench/real_data.py --settings papalexi --models sams_vae cpa_vae cvae --seeds 0 1 2
    python bench/real_data.py --table-only          # rebuild the table from the JSON files
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "real_data"
SETTINGS = ("papalexi", "shallow_sim", "mcfaline", "kang")
DEFAULT_MODELS = {
    "papalexi": ["sams_vae", "cpa_vae", "cvae"],
    "shallow_sim": ["sams_vae", "cpa_vae", "cvae"],
    "mcfaline": ["fcr", "sams_vae", "cvae"],
    "kang": ["fcr", "sams_vae", "cvae"],
}
#: the group of labels each setting is about
FOCUS = {"papalexi": "seen", "shallow_sim": "unseen", "mcfaline": "unseen", "kang": "unseen"}
TABLE_METRICS = ("pearson_delta", "mse_delta", "pearson")


def _random_train_val(labels: np.ndarray, rng: np.random.Generator, val_fraction: float = 0.2) -> np.ndarray:
    split = np.where(rng.random(len(labels)) < val_fraction, "val", "train").astype(object)
    return split


def build(setting: str, seed: int):
    """``(adata, fit options)`` of a setting at a seed (the split is in ``obs["split"]``)."""
    import anndata as ad

    import pyro_perturb as pp

    rng = np.random.default_rng(1000 + seed)
    if setting == "papalexi":
        adata = ad.read_h5ad(SHARED / "papalexi2021_eccite_lowmoi.h5ad")
        adata.obs["split"] = pp.splits.random_split(adata.n_obs, seed=seed)
        return adata, {}
    if setting == "shallow_sim":
        adata = pp.simulate.combinatorial(seed=seed, depth="shallow", frac_combinations_train=0.5)
        return adata, {}
    if setting == "mcfaline":
        adata = ad.read_h5ad(SHARED / "mcfaline2023_glioma_crispri.h5ad")
        lines = sorted(adata.obs["cell_line"].astype(str).unique())
        knockdowns = sorted(k for k in adata.obs["perturbation"].astype(str).unique() if k != "control")
        line = adata.obs["cell_line"].astype(str).to_numpy()
        pert = adata.obs["perturbation"].astype(str).to_numpy()
        split = _random_train_val(pert, rng)
        for k, kd in enumerate(knockdowns):
            split[(pert == kd) & (line == lines[(k + seed) % len(lines)])] = "test"
        controls = np.flatnonzero(pert == "control")
        split[rng.choice(controls, size=len(controls) // 5, replace=False)] = "test"
        adata.obs["split"] = split.astype(str)
        return adata, {"covariate_keys": ["cell_line"]}
    if setting == "kang":
        adata = ad.read_h5ad(SHARED / "kang2018_ifnb_pbmc.h5ad")
        types = sorted(adata.obs["cluster_id"].astype(str).unique())
        cell_type = adata.obs["cluster_id"].astype(str).to_numpy()
        group = adata.obs["group_id"].astype(str).to_numpy()
        split = _random_train_val(group, rng)
        split[(group == "stim") & (cell_type == types[seed % len(types)])] = "test"
        controls = np.flatnonzero(group == "ctrl")
        split[rng.choice(controls, size=len(controls) // 5, replace=False)] = "test"
        adata.obs["split"] = split.astype(str)
        return adata, {"covariate_keys": ["cluster_id"], "perturbation_key": "group_id", "control": "ctrl"}
    raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")


def noise_ceiling(data, seed: int = 0) -> dict:
    """How well the held-out data can be predicted at all. Each evaluated label's held-out
    cells and the held-out controls are halved at random; ``split_half`` is the mean over
    labels of the Pearson r between the two halves' log-normalised deltas, and ``ceiling``
    the mean over labels of ``sqrt(2 r / (1 + r))`` (Spearman-Brown, r clipped at 0): the
    Pearson delta a perfect predictor of the population effect would reach against the
    full held-out delta, given its sampling noise."""
    from pyro_perturb.evaluate.comparison import covariate_units
    from pyro_perturb.evaluate.data_stats import cell_means

    rng = np.random.default_rng(seed)
    heldout = np.flatnonzero(data.split != "train")
    keys = covariate_units(data, heldout) if data.spec.covariate_keys else data.label_names(heldout)
    half = rng.random(len(heldout)) < 0.5
    _, ln_a, _ = cell_means(data, heldout[half], keys=keys[half])
    _, ln_b, _ = cell_means(data, heldout[~half], keys=keys[~half])
    control = data.spec.control
    rs = []
    for key in ln_a.index:
        label = key.split(" / ")[-1]
        cov = key[: -len(label)] if data.spec.covariate_keys else ""
        base = f"{cov}{control}"
        if label == control or key not in ln_b.index or base not in ln_a.index or base not in ln_b.index:
            continue
        a, b = ln_a.loc[key] - ln_a.loc[base], ln_b.loc[key] - ln_b.loc[base]
        if a.std() > 0 and b.std() > 0:
            rs.append(float(np.corrcoef(a, b)[0, 1]))
    if not rs:
        return {"split_half": float("nan"), "ceiling": float("nan")}
    r = np.clip(np.array(rs), 0.0, None)
    return {"split_half": float(np.mean(rs)), "ceiling": float(np.mean(np.sqrt(2 * r / (1 + r))))}


def _ceiling(value) -> tuple[float, float]:
    if isinstance(value, dict):
        return value["split_half"], value["ceiling"]
    r = max(float(value), 0.0)  # records written before the ceiling was stored
    return float(value), float(np.sqrt(2 * r / (1 + r)))


def fit_one(setting: str, model: str, seed: int, out: Path, overrides: dict) -> Path:
    """Train one model at the registry defaults (plus ``overrides``); the run directory."""
    import pyro_perturb as pp

    adata, options = build(setting, seed)
    run_dir = out / "runs" / f"{setting}_{model}_seed{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    pp.fit(adata, model=model, out=run_dir, seed=seed, progress=False, **options, **overrides)
    (run_dir / "fit_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    print(f"{setting} {model} seed {seed}: fitted in {time.perf_counter() - t0:.0f} s -> {run_dir}", flush=True)
    return run_dir


def evaluate_one(setting: str, model: str, seed: int, out: Path, particles: int, overrides: dict, options: dict,
                 tag: str = "") -> dict:
    """Evaluate a fitted run as a user would (``Run.evaluate``); one JSON record."""
    import pyro_perturb as pp

    adata, _ = build(setting, seed)
    run_dir = out / "runs" / f"{setting}_{model}_seed{seed}"
    run = pp.load_run(run_dir)
    data = run.encode(adata)
    fit_seconds = float((run_dir / "fit_seconds.txt").read_text()) if (run_dir / "fit_seconds.txt").exists() else None
    t0 = time.perf_counter()
    results = run.evaluate(data, num_particles=20, seed=seed, ate_particles=particles, ate_ppc=False, ate_plots=False,
                           **options)
    history = run.history
    record = {
        "setting": setting,
        "tag": tag,
        "model": model,
        "seed": seed,
        "overrides": overrides,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "median_library": float(np.median(data.library)),
        "evaluation_options": options,
        "fit_seconds": fit_seconds,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "steps": int(history[-1].get("step") or 0) if history else 0,
        "epochs": int(history[-1]["epoch"]) + 1 if history else 0,
        "best_val_loss": float(np.nanmin([h["val_loss"] for h in history])) if history else None,
        "val_curve": [[h.get("step"), h["val_loss"]] for h in history],
        "test_iwelbo": results.get("test", {}).get("iwelbo"),
        "max_epochs": run.train_config.max_epochs,
        "max_steps": run.train_config.max_steps,
        "noise_ceiling_pearson_delta": noise_ceiling(data, seed),
        "comparison": results.get("comparison"),
    }
    (out / "json").mkdir(parents=True, exist_ok=True)
    path = out / "json" / f"{setting}_{model}_seed{seed}{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps(record, indent=1, default=float))
    print(f"{setting} {model} seed {seed}: {record['steps']} steps, evaluated -> {path}", flush=True)
    return record


def table(out: Path) -> str:
    """The Markdown table from every JSON in ``out/json``."""
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # nan means of constant predictors
    records = [json.loads(p.read_text()) for p in sorted((out / "json").glob("*.json"))]
    lines = ["# Models beside honest baselines (bench/real_data.py)", ""]
    tags = sorted({r.get("tag", "") for r in records})
    for setting, tag in [(s, t) for s in SETTINGS for t in tags]:
        recs = [r for r in records if r["setting"] == setting and r.get("tag", "") == tag
                and r.get("comparison") and "skipped" not in r["comparison"]]
        if not recs:
            continue
        group = FOCUS[setting]
        seeds = sorted({r["seed"] for r in recs})
        options = recs[0].get("evaluation_options") or {}
        ceiling = np.array([_ceiling(r["noise_ceiling_pearson_delta"]) for r in recs])
        variant = f" ({tag}: {', '.join(f'{k}={v}' for k, v in options.items())})" if tag else ""
        lines += [f"## {setting}{variant}: group `{group}`, seeds {seeds}", "",
                  f"Model drawn at {recs[0]['comparison'].get('library', '?')}, basal states from "
                  f"{recs[0]['comparison'].get('basal', 'prior')}; {recs[0]['comparison'].get('control_cells')} held-out "
                  f"control cells.", "",
                  f"Noise ceiling: split-half Pearson delta of the held-out data {np.nanmean(ceiling[:, 0]):.3f}, so a "
                  f"perfect predictor would reach a Pearson delta of about {np.nanmean(ceiling[:, 1]):.3f}. "
                  f"Steps reached: " + ", ".join(f"{r['model']} s{r['seed']}: {r['steps']}" for r in recs) + ".", ""]
        for stat in ("lognorm_delta", "pseudobulk_lfc"):
            rows = {}
            wins: dict = {}
            for r in recs:
                entry = r["comparison"][stat][group]
                for predictor, metrics in entry.items():
                    if not isinstance(metrics, dict) or predictor in ("winner",):
                        continue
                    name = r["model"] if predictor == "model" else predictor
                    if predictor != "model" and name in rows and r["model"] != recs[0]["model"]:
                        continue  # baselines are the same for every model of a seed
                    for m in TABLE_METRICS:
                        rows.setdefault(name, {}).setdefault(m, {})[r["seed"]] = metrics.get(m)
                for m, w in entry.get("winner", {}).items():
                    if m in TABLE_METRICS:
                        wins.setdefault(r["model"], {}).setdefault(m, []).append(bool(w["model_wins"]))
            lines.append(f"### {stat}")
            lines.append("")
            lines.append("| predictor | " + " | ".join(TABLE_METRICS) + " | beats best baseline (seeds) |")
            lines.append("|---" * (len(TABLE_METRICS) + 2) + "|")
            for name, per_metric in rows.items():
                cells = []
                for m in TABLE_METRICS:
                    vals = np.array([v for v in per_metric.get(m, {}).values() if v is not None], dtype=float)
                    cells.append(f"{np.nanmean(vals):.3f} +- {np.nanstd(vals):.3f}" if len(vals) else "-")
                w = wins.get(name)
                wcell = ", ".join(f"{m} {sum(v)}/{len(v)}" for m, v in w.items()) if w else ""
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {wcell} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    overrides = {}
    for item in args.set or []:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    options = {}
    for item in args.evaluate_set or []:
        key, value = item.split("=", 1)
        options[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    if not args.table_only:
        for setting in args.settings:
            if setting != "shallow_sim" and not SHARED.exists():
                print(f"skipping {setting}: {SHARED} not found")
                continue
            for seed in args.seeds:
                for model in args.models or DEFAULT_MODELS[setting]:
                    if args.phase in ("fit", "all"):
                        fit_one(setting, model, seed, out, overrides)
                    if args.phase in ("evaluate", "all"):
                        evaluate_one(setting, model, seed, out, args.particles, overrides, options, args.tag)
    text = table(out)
    (out / "real_data.md").write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--models", nargs="+", default=None, help="default: the setting's models")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--particles", type=int, default=500, help="model-effect particles")
    parser.add_argument("--set", action="append", help="training override key=value for every fit")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--evaluate-set", action="append", help="evaluator option key=value (e.g. ate_library=10000)")
    parser.add_argument("--tag", default="", help="an evaluation variant's name (its own JSON files and table section)")
    parser.add_argument("--phase", choices=("fit", "evaluate", "all"), default="all")
    parser.add_argument("--table-only", action="store_true")
    main(parser.parse_args())
