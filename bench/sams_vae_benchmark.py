"""SAMS-VAE family benchmark: combinatorial simulator, Papalexi 2021, throughput.

Tasks (``--task``):

* ``sim``: the Norman-style combinatorial OOD task (docs/data.md, "Split") on
  ``simulate.combinatorial(seed=s, frac_combinations_train=f)`` (10 true latents, 20
  singles, 30 doubles, 100 cells each, 500 controls, 200 genes; half the doubles held
  out as test, a fraction f of the others kept for training). Each model is trained with
  its registry defaults (``fit`` without tuning, the user's path) plus ``--set``
  overrides, then evaluated: test IWELBO (``--iwelbo-particles``, default 100), ATE
  metrics per treatment split against the data ATE on held-out cells and against the
  simulator's true ATE, and, for models with a mask (or a dense effect), target
  identification against the true sparse targets after matching latents
  (:func:`match_latents` on the posterior latents; masks > 0.5, top-k |E| for CPA-VAE).
* ``papalexi``: ``../shared/data/papalexi2021_eccite_lowmoi.h5ad`` (25 knockouts +
  control, 20,729 cells x 299 genes; seeded random 64/16/20 cell split): test IWELBO, ATE
  metrics (data ATE on held-out cells), and for SAMS-VAE / CPA-VAE whether the
  IFN-gamma pathway knockouts (IFNGR1, IFNGR2, JAK2, STAT1) share latent targets
  (mask Jaccard / effect cosine within the group vs between group and other knockouts).
* ``throughput``: training cells/s (steps only, after warm-up steps) and the model-ATE
  time for 200 treatments x ``--ate-particles`` on a synthetic Replogle-like shape
  (bench/results/reference_anchors.md: 1,187 genes, batch 512, 5 particles, latent 100, hidden 400).

Each run is written to ``OUT/runs/TASK_MODEL_fF_seedS.json`` as soon as it is done (a
re-run skips finished ones); ``--summarize`` (also run at the end) writes
``OUT/sams_vae_TASK.md`` / ``.csv`` with means and standard deviations over seeds.

Usage::

    python bench/sams_vae_benchmark.py --task sim --seeds 0 1 2 --fracs 0 0.5
    python bench/sams_vae_benchmark.py --task papalexi --seeds 0 1 2
    python bench/sams_vae_benchmark.py --task throughput
    python bench/sams_vae_benchmark.py --task sim --set max_epochs=50   # reduced
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

MODELS = ["sams_vae", "sams_vae_mf", "cpa_vae", "cvae", "svae_plus"]
ROOT = Path(__file__).resolve().parents[1]
PAPALEXI = ROOT.parent / "shared" / "data" / "papalexi2021_eccite_lowmoi.h5ad"
IFN_GROUP = ["IFNGR1", "IFNGR2", "JAK2", "STAT1"]


def _parse_sets(items):
    out = {}
    for item in items or []:
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _targets(run, data, adata) -> dict:
    """Target identification against the simulator's truth after matching latents."""
    from pyro_perturb.evaluate.metrics import match_latents, mcc, target_identification

    gt = adata.uns["ground_truth"]
    truth = np.asarray(gt["targets"])
    order = [data.spec.perturbations.index(p) for p in gt["perturbations"]]
    lat = run.latents(data)["X_latent"]
    match, _ = match_latents(adata.obsm["z_true"], lat)
    out = {"mcc": mcc(adata.obsm["z_true"], lat)}
    probs = getattr(run.guide, "mask_probabilities", None)
    if probs is not None:
        pred = probs().cpu().numpy()[order]
        t = target_identification(truth, pred, match)
        out["mask_on_fraction"] = float((pred > 0.5).mean())
    elif hasattr(run.guide, "effect_mean"):
        pred = np.abs(run.guide.effect_mean().cpu().numpy()[order])
        t = target_identification(truth, pred, match, scores=True)
    else:
        return out
    out.update({f"target_{k}": v for k, v in t.items() if k in ("precision", "recall", "f1")})
    # the same restricted to the inferred latents matched to a true one: does the model
    # put each effect on the right latent(s), ignoring extra latents it may use besides
    ok = match >= 0
    tm = target_identification(truth[:, ok], pred[:, match[ok]], np.arange(int(ok.sum())),
                               scores=probs is None)
    out.update({f"target_matched_{k}": v for k, v in tm.items() if k in ("precision", "recall", "f1")})
    return out


def _pathway(run, data) -> dict:
    """Do the IFN-gamma pathway knockouts share latent targets?"""
    spec = data.spec
    if not all(g in spec.perturbations for g in IFN_GROUP):
        return {}
    idx = [spec.perturbations.index(g) for g in IFN_GROUP]
    others = [i for i in range(spec.n_perturbations) if i not in idx]
    probs = getattr(run.guide, "mask_probabilities", None)
    if probs is not None:
        m = probs().cpu().numpy() > 0.5

        def sim(a, b):
            u = np.logical_or(m[a], m[b]).sum()
            return float(np.logical_and(m[a], m[b]).sum() / u) if u else 0.0

        key = "jaccard"
        shared = np.logical_and.reduce(m[idx], axis=0)
        extra = {"ifn_shared_latents_all4": int(shared.sum()),
                 "ifn_latents_used": [int(m[i].sum()) for i in idx]}
    elif hasattr(run.guide, "effect_mean"):
        e = run.guide.effect_mean().cpu().numpy()

        def sim(a, b):
            na, nb = np.linalg.norm(e[a]), np.linalg.norm(e[b])
            return float(e[a] @ e[b] / (na * nb)) if na > 0 and nb > 0 else 0.0

        key, extra = "cosine", {}
    else:
        return {}
    within = [sim(a, b) for i, a in enumerate(idx) for b in idx[i + 1 :]]
    between = [sim(a, b) for a in idx for b in others]
    rest = [sim(a, b) for i, a in enumerate(others) for b in others[i + 1 :]]
    return {f"ifn_{key}_within": float(np.mean(within)), f"ifn_{key}_to_others": float(np.mean(between)),
            f"others_{key}_pairwise": float(np.mean(rest)), **extra}


def _elbo_terms(run, data, split="test", particles=5, seed=0) -> dict:
    """Per-cell ELBO terms on a split (diagnostics of the SAMS-VAE vs baselines question):
    ``loglik`` = E_q log p(x | z), ``kl_local`` = E_q [log q(z) - log p(z)] of the cell
    sites, and ``kl_global`` = E_q [log q - log p] of the global sites (counted once for
    the whole training set, reported per training cell and in total)."""
    import pyro
    import torch
    from pyro import poutine
    from pyro.poutine.util import prune_subsample_sites

    sums = {"loglik": 0.0, "kl_local": 0.0}
    kl_global, n = [], 0
    with torch.no_grad():
        pyro.set_rng_seed(seed)
        for batch in data.batches(split, 1024, device=run.device):
            with pyro.plate("_p", particles, dim=-2):
                g = poutine.trace(run.guide).get_trace(batch)
                m = poutine.trace(poutine.replay(run.model, trace=g)).get_trace(batch)
            g, m = prune_subsample_sites(g), prune_subsample_sites(m)
            g.compute_log_prob()
            m.compute_log_prob()
            glob = 0.0
            for name, site in m.nodes.items():
                if site["type"] != "sample":
                    continue
                local = "cells" in {f.name for f in site["cond_indep_stack"]}
                # unscaled: the plate's n / B minibatch scale is not wanted here
                lp = site["unscaled_log_prob"].sum().item() / particles
                if site["is_observed"]:
                    sums["loglik"] += lp
                elif local:
                    lq = g.nodes[name]["unscaled_log_prob"].sum().item() / particles
                    sums["kl_local"] += lq - lp
                else:
                    lq = g.nodes[name]["unscaled_log_prob"].sum().item() / particles
                    glob += lq - lp
            kl_global.append(glob)
            n += batch.size
    n_train = len(data.indices("train"))
    return {f"{split}_loglik": sums["loglik"] / n, f"{split}_kl_local": sums["kl_local"] / n,
            "kl_global_total": float(np.mean(kl_global)), "kl_global_per_train_cell": float(np.mean(kl_global)) / n_train,
            "elbo_terms_unscaled": True}


def run_one(task, model, seed, frac, sets, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import pyro_perturb as pp
    from pyro_perturb.evaluate.ate import ate_results
    from pyro_perturb.infer.iwelbo import iwelbo

    if task == "sim":
        adata = pp.simulate.combinatorial(seed=seed, frac_combinations_train=frac)
    else:
        import anndata

        adata = anndata.read_h5ad(PAPALEXI)
    t0 = time.perf_counter()
    run = pp.fit(adata, model=model, seed=seed, **sets)
    train_s = time.perf_counter() - t0
    data = run.data
    n_train = len(data.indices("train"))
    epoch_s = [r["seconds"] for r in run.history]
    out = {"task": task, "model": model, "seed": seed, "frac": frac, "sets": sets,
           "epochs": len(run.history), "train_seconds": train_s,
           "cells_per_s_with_val": n_train * len(epoch_s) / max(sum(epoch_s), 1e-9),
           "n_train": n_train, "n_test": int(len(data.indices("test")))}
    t0 = time.perf_counter()
    w = iwelbo(run.model, run.guide, data, "test", args.iwelbo_particles, seed=seed, device=run.device)
    out["test_iwelbo"] = float(w.mean())
    out["iwelbo_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = ate_results(run.model, run.guide, data, num_particles=args.ate_particles, seed=seed, device=run.device)
    out["ate_seconds"] = time.perf_counter() - t0
    for split, m in res["metrics"].items():
        for k, v in m.items():
            out[f"{split}_{k}"] = v
    for split, m in res.get("metrics_true", {}).items():
        for k, v in m.items():
            out[f"true_{split}_{k}"] = v
    for split, m in res.get("metrics_data_vs_true", {}).items():
        out[f"data_vs_true_{split}_ate_pearson"] = m["ate_pearson"]
    out.update(_elbo_terms(run, data, seed=seed))
    if res["notes"]:
        out["ate_note"] = next(iter(res["notes"].values()))
        out["ate_unrepresentable"] = len(res["notes"])
    if task == "sim":
        out.update(_targets(run, data, adata))
    else:
        out.update(_pathway(run, data))
        probs = getattr(run.guide, "mask_probabilities", None)
        if probs is not None and args.out:
            from pyro_perturb.evaluate import plots

            plots.mask_heatmap(probs().cpu().numpy(), list(data.spec.perturbations),
                               Path(args.out) / f"mask_{task}_{model}_seed{seed}.png")
    if args.out and seed == args.seeds[0]:
        from pyro_perturb.evaluate import plots

        plots.ate_scatter(res, Path(args.out) / f"ate_{task}_{model}_f{frac}_seed{seed}.png", title=f"{model} {task} f={frac}")
        if task == "sim":
            probs = getattr(run.guide, "mask_probabilities", None)
            if probs is not None:
                plots.mask_heatmap(probs().cpu().numpy(), list(data.spec.perturbations),
                                   Path(args.out) / f"mask_{task}_{model}_f{frac}_seed{seed}.png")
    return out


def throughput(model, args) -> dict:
    """Training cells/s (steps only) and model-ATE seconds on a Replogle-like shape."""
    import pyro
    import torch

    torch.set_num_threads(args.threads)
    import pyro_perturb as pp
    from pyro_perturb.evaluate.predictive import model_ate
    from pyro_perturb.infer.engine import make_elbo
    from pyro_perturb.registry import build, get_entry

    adata = pp.simulate.combinatorial(seed=0, n_singles=200, n_doubles=0, cells_per_perturbation=10,
                                      n_control_cells=200, n_genes=1187, n_ate_draws=10)
    data = pp.PerturbationData.from_anndata(adata)
    pyro.set_rng_seed(0)
    m, g, _ = build(model, data.spec, {}, gene_stats=data.gene_stats("train"))
    cfg = get_entry(model).train_defaults
    bs, particles = cfg.get("batch_size", 512), cfg.get("num_particles", 1)
    elbo = make_elbo(cfg.get("elbo", "trace"), particles, m.max_plate_nesting)
    params = list(m.parameters()) + list(g.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    batches = list(data.batches("train", bs, shuffle=True))
    batches = [b for b in batches if b.size == bs] or batches

    def step(b):
        loss = elbo.differentiable_loss(m, g, b)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(args.warmup_steps):
        step(batches[i % len(batches)])
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % len(batches)])
    dt = time.perf_counter() - t0
    out = {"task": "throughput", "model": model, "batch_size": bs, "num_particles": particles,
           "cells_per_s": bs * args.steps / dt, "n_genes": 1187}
    if getattr(m, "composes", True):
        labels = list(data.spec.perturbations)
    else:  # one-hot models: labels they were trained on (all singles here)
        labels = [lab for lab in data.spec.labels if lab != data.spec.control]
    t0 = time.perf_counter()
    model_ate(m, g, data.spec, labels, num_particles=args.ate_particles, seed=0)
    out["ate_seconds"] = time.perf_counter() - t0
    out["ate_treatments"] = len(labels)
    out["ate_particles"] = args.ate_particles
    return out


SUMMARY_COLS = [
    ("test_iwelbo", "test IWELBO"),
    ("iwelbo_vs_sams", "test IWELBO - SAMS-VAE's (paired)"),
    ("test_ate_pearson", "ATE r (test trt)"),
    ("test_ate_r2", "ATE R2 (test trt)"),
    ("test_ate_pearson_top20", "ATE r top20 (test)"),
    ("true_test_ate_pearson", "ATE r vs true (test)"),
    ("true_test_ate_r2", "ATE R2 vs true (test)"),
    ("train_ate_pearson", "ATE r (train trt)"),
    ("train_ate_r2", "ATE R2 (train trt)"),
    ("train_ate_pearson_top20", "ATE r top20 (train)"),
    ("all_ate_pearson", "ATE r (all)"),
    ("target_precision", "target prec."),
    ("target_recall", "target recall"),
    ("target_f1", "target F1"),
    ("target_matched_precision", "target prec. (matched latents)"),
    ("target_matched_f1", "target F1 (matched latents)"),
    ("mcc", "MCC"),
    ("ifn_jaccard_within", "IFN mask Jaccard within"),
    ("ifn_jaccard_to_others", "IFN mask Jaccard to others"),
    ("ifn_shared_latents_all4", "latents shared by all 4 IFN KOs"),
    ("ifn_cosine_within", "IFN effect cosine within"),
    ("ifn_cosine_to_others", "IFN effect cosine to others"),
    ("test_loglik", "test E log p(x|z)"),
    ("test_kl_local", "test KL local"),
    ("kl_global_per_train_cell", "KL global / train cell"),
    ("epochs", "epochs"),
    ("train_seconds", "train s"),
    ("ate_seconds", "ATE s"),
]


def summarize(out: Path, task: str) -> str:
    import pandas as pd

    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"{task}_*.json"))]
    if not rows:
        return ""
    for r in rows:
        # runs made before the fix summed the plate-scaled log-probabilities: each of the
        # ceil(n_test / 1024) evaluation batches was weighted n_test / B, i.e. the per-cell
        # terms came out multiplied by the number of batches (exactly so when the batches'
        # per-cell means agree); undo that
        if "test_loglik" in r and not r.get("elbo_terms_unscaled"):
            k = -(-r["n_test"] // 1024)
            r["test_loglik"] /= k
            r["test_kl_local"] /= k
    df = pd.DataFrame(rows)
    if "test_iwelbo" in df.columns:
        # paired by dataset: different seeds simulate different data, whose IWELBO levels
        # differ by more than the models do; compare each model with SAMS-VAE on the same data
        keys = ["frac", "seed"] if task == "sim" else ["seed"]
        ref = df[df.model == "sams_vae"].set_index(keys)["test_iwelbo"]
        df["iwelbo_vs_sams"] = [
            r.test_iwelbo - ref.get(tuple(getattr(r, k) for k in keys) if len(keys) > 1 else getattr(r, keys[0]), np.nan)
            for r in df.itertuples()
        ]
    if task == "throughput":
        table = df[["model", "batch_size", "num_particles", "cells_per_s", "ate_treatments", "ate_particles", "ate_seconds"]]
        md = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
        md += "\n".join("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |"
                         for row in table.itertuples(index=False))
    else:
        group = ["model", "frac"] if task == "sim" else ["model"]
        lines = []
        cols = [(c, n) for c, n in SUMMARY_COLS if c in df.columns and df[c].notna().any()]
        header = "| " + " | ".join(group + ["seeds"] + [n for _, n in cols]) + " |"
        lines += [header, "|" + "---|" * (len(group) + 1 + len(cols))]
        order = {m: i for i, m in enumerate(MODELS)}
        for key, sub in sorted(df.groupby(group), key=lambda kv: (kv[0][1] if task == "sim" else 0, order.get(kv[0][0], 99))):
            key = key if isinstance(key, tuple) else (key,)
            cells = [str(k) for k in key] + [str(len(sub))]
            for c, _ in cols:
                v = pd.to_numeric(sub[c], errors="coerce").dropna()
                if len(v) == 0:
                    cells.append("n/a")
                elif len(v) == 1:
                    cells.append(f"{v.iloc[0]:.3g}")
                else:
                    cells.append(f"{v.mean():.3g} ± {v.std(ddof=1):.2g}")
            lines.append("| " + " | ".join(cells) + " |")
        md = "\n".join(lines)
        notes = df.dropna(subset=["ate_note"]) if "ate_note" in df.columns else []
        if len(notes):
            md += "\n\nn/a ATE entries: " + "; ".join(sorted({f"{r.model}: {r.ate_note}" for r in notes.itertuples()}))
    df.to_csv(out / f"sams_vae_{task}.csv", index=False)
    (out / f"sams_vae_{task}.md").write_text(md + "\n")
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["sim", "papalexi", "throughput"], default="sim")
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fracs", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="fit setting for every model")
    p.add_argument("--iwelbo-particles", type=int, default=100)
    p.add_argument("--ate-particles", type=int, default=2500)
    p.add_argument("--steps", type=int, default=30, help="throughput: timed steps")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--summarize", action="store_true", help="only rebuild the tables")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        sets = _parse_sets(args.set)
        fracs = args.fracs if args.task == "sim" else [None]
        seeds = args.seeds if args.task != "throughput" else [0]
        # seeds outermost: an interrupted benchmark still has balanced partial results
        for seed in seeds:
            for frac in fracs:
                for model in args.models:
                    tag = f"{args.task}_{model}" + (f"_f{frac}" if frac is not None else "") + f"_seed{seed}"
                    path = out / "runs" / f"{tag}.json"
                    if path.exists():
                        continue
                    t0 = time.perf_counter()
                    try:
                        res = throughput(model, args) if args.task == "throughput" else run_one(args.task, model, seed, frac, sets, args)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        print(f"{tag}: FAILED {type(e).__name__}: {e}", flush=True)
                        continue
                    path.write_text(json.dumps(res, indent=1, default=float))
                    print(f"{tag}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    print(summarize(out, args.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
