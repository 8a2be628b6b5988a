"""Why does SAMS-VAE recover the simulator's sparse targets only weakly?

Experiments on ``simulate.combinatorial`` (10 true latents, 20 singles, 30 doubles,
200 genes), the setting of ``bench/sams_vae_benchmark.py --task sim``. Findings are in
``bench/results/sams_vae_target_recovery.md``.

Tasks (``--task``):

* ``truth``: the simulator's ground truth per seed: targets per single and per true
  latent, |E| of the targets, and how much each target moves the expression (the true
  ATE with and without that one target) relative to the sampling noise of a 100-cell mean.
* ``scaling``: scales and log-densities of every site of the model and guide traces in
  the training path (vectorised particles, a minibatch of the training split): are the
  global E and M counted once per step, the cell sites N / B, is log q(M) the hard
  Bernoulli mass.
* ``ceiling``: the evaluation pipeline (Hungarian matching of latents by |correlation|,
  masks > 0.5 counted over all L inferred latents) applied to the truth itself: the true
  latents and mask (F1 = 1 if the pipeline is sound), the truth seen through a random
  rotation of the latent space, and the truth embedded in L = 100 latents with each true
  axis spread over 2 inferred ones.
* ``train``: fit ``--model`` (registry defaults plus ``--set`` overrides) for each seed
  and record held-out metrics (test IWELBO, ATE r of the held-out doubles against the
  simulator's true ATE), the benchmark's target metrics, and basis diagnostics:

  - ``axis_concentration``: how each true axis is embedded in the learned latents
    (least-squares map W, true -> learned basal latents, on all cells): mean over true axes of
    ``max_l W_kl^2 / sum_l W_kl^2`` (1: one learned latent per true axis);
  - ``masks_per_true_target``: masks on / true targets;
  - ``basis_free_*``: the learned shifts ``effect_mean`` (T x L) mapped to the true basis
    by the least-squares map A (learned -> true basal latents, on all cells): their correlation
    with the true shifts and the AUROC / top-k F1 of ``|shift in true basis|`` against the
    true targets. High values with a low mask F1 mean the model found the right shifts
    in a mixed basis;
  - ``ideal_mask_f1``: the true shifts expressed in the learned basis (S @ W), called on
    where ``|.| > --ideal-threshold``, scored by the same pipeline: the best a mask in
    this learned basis could score;
  - every ``--every`` epochs: mask on-fraction, undecided fraction (0.1 < q < 0.9),
    target F1 and MCC (``dynamics``);
  - for L <= 20, ``varimax_*`` / ``unrotated_*``: the learned latent space rotated by the
    varimax rotation of the learned shifts (post-hoc symmetry breaking), targets called
    where |shift| > ``--ideal-threshold``.

  ``--oracle-mask-init LOGIT`` starts the mask logits at +-LOGIT on the true targets
  (first K latents): does training keep, and align its basis to, the true masks?

* ``summarize``: table of the ``train`` runs (mean +- sd over seeds per tag).

Usage::

    python bench/sams_vae_targets.py --task truth --seeds 0 1 2
    python bench/sams_vae_targets.py --task train --seeds 0 1 2 --tag L10 --set n_latent=10
    python bench/sams_vae_targets.py --task train --tag oracleL10 --set n_latent=10 --oracle-mask-init 5
    python bench/sams_vae_targets.py --task summarize
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "sams_vae_targets"


def _benchmark_module():
    """bench/sams_vae_benchmark.py (its ``_targets`` and ``_parse_sets``: one copy)."""
    spec = importlib.util.spec_from_file_location("sams_vae_benchmark", ROOT / "bench" / "sams_vae_benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares map (centred): y ~ x @ W; returns W (x dims, y dims)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.lstsq(xc, yc, rcond=None)[0]


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.ravel().astype(int), scores.ravel()))


def _topk_f1(truth: np.ndarray, mag: np.ndarray) -> float:
    from pyro_perturb.evaluate.metrics import target_identification

    k = truth.shape[1]
    return target_identification(truth, np.abs(mag), np.arange(k), scores=True)["f1"]


# ------------------------------------------------------------------------------ truth
def task_truth(args) -> dict:
    import pyro_perturb as pp
    from pyro_perturb.data.simulate import true_ate

    rows = []
    for seed in args.seeds:
        ad = pp.simulate.combinatorial(seed=seed, frac_combinations_train=args.frac, n_ate_draws=500)
        gt = ad.uns["ground_truth"]
        rng = np.random.default_rng(seed)
        M = np.asarray(gt["targets"]).astype(bool)
        S = np.asarray(gt["shifts"], dtype=float)
        absE = np.abs(S[M])
        theta = gt.get("theta")
        # the expression effect of each single target: ATE(shift) - ATE(shift without it)
        drops, labels = [], []
        for t, k in zip(*np.nonzero(M)):
            s_wo = S[t].copy()
            s_wo[k] = 0.0
            labels.append((t, k))
            drops.append(np.stack([S[t], s_wo]))
        a = true_ate(gt["decoder"], np.concatenate(drops), theta, n_draws=4000, seed=seed)
        a = np.asarray(a).reshape(len(drops), 2, -1)
        effect = np.linalg.norm(a[:, 0] - a[:, 1], axis=1)
        # noise: the squared norm (over genes) of the difference of the means of two
        # disjoint random 100-cell sets of control cells (log-normalised), 500 draws; a
        # target whose effect norm^2 plus the mean of that null stays below the null's
        # 99th percentile is not detectable from one single's 100 cells in expression space
        x = ad[ad.obs["perturbation"] == "control"].X
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        lx = np.log2(1 + 1e4 * x / x.sum(1, keepdims=True))
        null = []
        for _ in range(500):
            perm = rng.permutation(lx.shape[0])
            null.append(float(((lx[perm[:100]].mean(0) - lx[perm[100:200]].mean(0)) ** 2).sum()))
        null = np.asarray(null)
        noise = float(np.sqrt(null.mean()))
        undetectable = effect**2 + null.mean() < np.quantile(null, 0.99)
        shared = (M.sum(0))  # singles targeting each true latent
        rows.append({
            "seed": seed,
            "targets_per_single": float(M.sum(1).mean()),
            "singles_per_true_latent_min": int(shared.min()),
            "singles_per_true_latent_max": int(shared.max()),
            "abs_E_median": float(np.median(absE)),
            "frac_abs_E_below_0.3": float((absE < 0.3).mean()),
            "frac_abs_E_below_0.5": float((absE < 0.5).mean()),
            "target_effect_norm_median": float(np.median(effect)),
            "noise_norm_100_cells": float(noise),
            "frac_targets_effect_norm_below_noise_norm": float((effect < noise).mean()),
            "frac_targets_undetectable_1pct": float(undetectable.mean()),
            "abs_E_of_undetectable": [float(v) for v in np.sort(np.abs(S[M])[undetectable])],
        })
        print(json.dumps(rows[-1]), flush=True)
    return {"truth": rows}


# ---------------------------------------------------------------------------- scaling
def task_scaling(args) -> dict:
    """Site scales and log-probabilities in the training path (vectorised particles)."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro import poutine

    import pyro_perturb as pp
    from pyro_perturb.registry import build, get_entry

    ad = pp.simulate.combinatorial(seed=0, frac_combinations_train=args.frac, n_ate_draws=10)
    data = pp.PerturbationData.from_anndata(ad)
    pyro.set_rng_seed(0)
    model, guide, _ = build(args.model, data.spec, {}, gene_stats=data.gene_stats("train"))
    cfg = get_entry(args.model).train_defaults
    P = cfg["num_particles"]
    idx = data.indices("train")
    B = cfg["batch_size"]
    batch = next(iter(data.batches("train", B, shuffle=True, seed=0)))
    out = {"n_train": int(len(idx)), "batch": int(batch.size), "particles": P, "sites": {}}
    with torch.no_grad():
        pyro.set_rng_seed(1)  # the same draws as the engine's loss below
        with pyro.plate("particles", P, dim=-(model.max_plate_nesting + 1)):
            g = poutine.trace(guide).get_trace(batch)
            m = poutine.trace(poutine.replay(model, trace=g)).get_trace(batch)
        g.compute_log_prob()
        m.compute_log_prob()
        for name, site in m.nodes.items():
            if site["type"] != "sample":
                continue
            entry = {"model_scale": float(site["scale"]), "model_log_prob_sum_per_particle":
                     float(site["log_prob_sum"]) / P}
            if name in g.nodes:
                entry["guide_scale"] = float(g.nodes[name]["scale"])
                entry["guide_log_prob_sum_per_particle"] = float(g.nodes[name]["log_prob_sum"]) / P
            out["sites"][name] = entry
        if "M" in g.nodes:
            v = g.nodes["M"]["value"]
            hard = dist.Bernoulli(logits=guide.mask_logits).log_prob(v).sum() / P
            out["M_value_is_binary"] = bool(set(v.unique().tolist()) <= {0.0, 1.0})
            out["M_log_q_minus_hard_bernoulli"] = float(g.nodes["M"]["log_prob_sum"] / P - hard)
        # the engine's loss against the hand-made estimate -(N/B local + global), per particle
        elbo = pp.infer.engine.make_elbo("trace", P, model.max_plate_nesting)
        pyro.set_rng_seed(1)
        loss = float(elbo.loss(model, guide, batch))
        out["engine_loss"] = loss
        out["hand_loss"] = -sum(
            e["model_log_prob_sum_per_particle"] - e.get("guide_log_prob_sum_per_particle", 0.0)
            for k, e in out["sites"].items()
        )
    print(json.dumps(out, indent=1), flush=True)
    return out


# ---------------------------------------------------------------------------- ceiling
def _pipeline_f1(z_true, latents, truth, pred_mask) -> dict:
    from pyro_perturb.evaluate.metrics import match_latents, target_identification

    match, corr = match_latents(z_true, latents)
    t = target_identification(truth, pred_mask.astype(float), match)
    return {"f1": t["f1"], "precision": t["precision"], "recall": t["recall"], "mcc": float(corr.mean())}


def task_ceiling(args) -> dict:
    import pyro_perturb as pp
    from pyro_perturb.data.simulate import _orthogonal

    rows = []
    for seed in args.seeds:
        ad = pp.simulate.combinatorial(seed=seed, frac_combinations_train=args.frac, n_ate_draws=10)
        gt = ad.uns["ground_truth"]
        z = np.asarray(ad.obsm["z_true"], dtype=float)
        M = np.asarray(gt["targets"]).astype(float)
        S = np.asarray(gt["shifts"], dtype=float)
        K = z.shape[1]
        rng = np.random.default_rng(seed)
        row = {"seed": seed, "truth": _pipeline_f1(z, z, M, M > 0.5)}
        R = _orthogonal(rng, K, K)
        for thr in (0.1, 0.3):
            row[f"rotated_thr{thr}"] = _pipeline_f1(z, z @ R, M, np.abs(S @ R) > thr)
        # each true axis spread over 2 of 100 latents (45 degrees), rest noise latents
        L = 100
        W = np.zeros((K, L))
        for k in range(K):
            W[k, 2 * k] = W[k, 2 * k + 1] = np.sqrt(0.5)
        lat = z @ W + 0.0 * rng.standard_normal((z.shape[0], L))
        lat[:, 2 * K:] = rng.standard_normal((z.shape[0], L - 2 * K))
        row["split_in_two_of_100"] = _pipeline_f1(z, lat, M, np.abs(S @ W) > 0.1)
        # partially split: 80 / 20 % of the variance
        W2 = np.zeros((K, L))
        for k in range(K):
            W2[k, 2 * k], W2[k, 2 * k + 1] = np.sqrt(0.8), np.sqrt(0.2)
        lat2 = z @ W2
        lat2 = np.concatenate([lat2[:, : 2 * K], rng.standard_normal((z.shape[0], L - 2 * K))], 1)
        row["split_80_20_thr0.3"] = _pipeline_f1(z, lat2, M, np.abs(S @ W2) > 0.3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"ceiling": rows}


# ------------------------------------------------------------------------------ train
def _diagnostics(run, data, adata, bench, ideal_threshold: float) -> dict:
    gt = adata.uns["ground_truth"]
    truth = np.asarray(gt["targets"]).astype(float)
    S = np.asarray(gt["shifts"], dtype=float)
    order = [data.spec.perturbations.index(p) for p in gt["perturbations"]]
    out = bench._targets(run, data, adata)
    # the basis maps come from the basal latents (learned X_basal vs the true z_basal):
    # fitted on X_latent, 100 latents could absorb the 48 label means and make the
    # "learned shifts in the true basis" agree with the truth by construction
    lat = run.latents(data)["X_basal"]
    z = np.asarray(adata.obsm["z_basal_true"], dtype=float)
    W = _lstsq(z, lat)  # (K, L): true -> learned
    share = W**2 / np.maximum((W**2).sum(1, keepdims=True), 1e-12)
    out["axis_concentration"] = float(share.max(1).mean())
    out["axis_latents_for_90pct"] = float(np.mean([np.searchsorted(np.cumsum(np.sort(r)[::-1]), 0.9) + 1 for r in share]))
    A = _lstsq(lat, z)  # (L, K): learned -> true
    resid = (z - z.mean(0)) - (lat - lat.mean(0)) @ A
    out["linear_r2_true_from_learned"] = float(1 - resid.var(0).sum() / z.var(0).sum())
    if hasattr(run.guide, "effect_mean"):
        delta = run.guide.effect_mean().cpu().numpy()[order]  # (T, L)
        s_hat = delta @ A  # (T, K) learned shifts in the true basis
        out["basis_free_shift_r"] = float(np.corrcoef(s_hat.ravel(), S.ravel())[0, 1])
        out["basis_free_auroc"] = _auroc(np.abs(s_hat), truth)
        out["basis_free_topk_f1"] = _topk_f1(truth, s_hat)
        from pyro_perturb.evaluate.metrics import match_latents, target_identification

        match, _ = match_latents(adata.obsm["z_true"], run.latents(data)["X_latent"])  # the pipeline's
        ideal = np.abs(S @ W) > ideal_threshold
        t = target_identification(truth, ideal.astype(float), match)
        out["ideal_mask_f1"] = t["f1"]
        out["ideal_mask_precision"] = t["precision"]
        out["ideal_masks_per_true_target"] = float(ideal.sum() / truth.sum())
    probs = getattr(run.guide, "mask_probabilities", None)
    if probs is not None:
        q = probs().cpu().numpy()[order]
        out["masks_per_true_target"] = float((q > 0.5).sum() / truth.sum())
        out["mask_undecided"] = float(((q > 0.1) & (q < 0.9)).mean())
        out["latents_used"] = int((q > 0.5).any(0).sum())
    return out


def _varimax(loadings: np.ndarray, iters: int = 200, tol: float = 1e-8) -> np.ndarray:
    """Orthogonal (L, L) rotation R maximising the varimax criterion of ``loadings @ R``
    (Kaiser 1958; the SVD iteration): columns with few large entries, i.e. sparse shifts."""
    n, k = loadings.shape
    R = np.eye(k)
    last = 0.0
    for _ in range(iters):
        lam = loadings @ R
        u, sv, vt = np.linalg.svd(loadings.T @ (lam**3 - lam @ np.diag((lam**2).sum(0)) / n))
        R = u @ vt
        if sv.sum() < last * (1 + tol):
            break
        last = sv.sum()
    return R


def _varimax_targets(run, data, adata, threshold: float) -> dict:
    """Post-hoc symmetry breaking (L <= 20 only): rotate the learned latent space by the
    varimax rotation of the learned shifts, call targets where |rotated shift| >
    ``threshold``, score with the pipeline. Unrotated, the same call on the learned shifts."""
    from pyro_perturb.evaluate.metrics import match_latents, target_identification

    gt = adata.uns["ground_truth"]
    truth = np.asarray(gt["targets"]).astype(float)
    order = [data.spec.perturbations.index(p) for p in gt["perturbations"]]
    delta = run.guide.effect_mean().cpu().numpy()[order]
    lat = run.latents(data)["X_latent"]
    R = _varimax(delta)
    out = {}
    for name, rot in (("unrotated", np.eye(delta.shape[1])), ("varimax", R)):
        match, corr = match_latents(adata.obsm["z_true"], lat @ rot)
        t = target_identification(truth, (np.abs(delta @ rot) > threshold).astype(float), match)
        z = np.asarray(adata.obsm["z_basal_true"], dtype=float)
        W = _lstsq(z, run.latents(data)["X_basal"] @ rot)
        share = W**2 / np.maximum((W**2).sum(1, keepdims=True), 1e-12)
        out.update({f"{name}_shift_f1": t["f1"], f"{name}_mcc": float(corr.mean()),
                    f"{name}_axis_concentration": float(share.max(1).mean())})
    return out


def _evaluate(run, data, adata, args, seed, bench) -> dict:
    from pyro_perturb.evaluate.ate import ate_results
    from pyro_perturb.infer.iwelbo import iwelbo

    out = {}
    t0 = time.perf_counter()
    w = iwelbo(run.model, run.guide, data, "test", args.iwelbo_particles, seed=seed, device=run.device)
    out["test_iwelbo"] = float(w.mean())
    res = ate_results(run.model, run.guide, data, num_particles=args.ate_particles, seed=seed, device=run.device)
    for split, m in res.get("metrics_true", {}).items():
        out[f"true_{split}_ate_pearson"] = m["ate_pearson"]
        out[f"true_{split}_ate_r2"] = m["ate_r2"]
    out["test_ate_pearson"] = res["metrics"].get("test", {}).get("ate_pearson")
    out["eval_seconds"] = time.perf_counter() - t0
    out.update(_diagnostics(run, data, adata, bench, args.ideal_threshold))
    if hasattr(run.guide, "effect_mean") and run.guide.n_latent <= 20:
        out.update(_varimax_targets(run, data, adata, args.ideal_threshold))
    return out


def _oracle_mask_init(guide, data, adata, logit: float) -> None:
    """Start q(M) at the true targets, on the first K latents (an oracle, to ask whether
    the objective keeps an aligned basis once it is given one): logit ``+logit`` on the
    true targets, ``-logit`` elsewhere; latents beyond the K true ones start off."""
    import torch

    gt = adata.uns["ground_truth"]
    truth = np.asarray(gt["targets"]).astype(bool)
    K = truth.shape[1]
    if guide.n_latent < K:
        raise ValueError(f"--oracle-mask-init needs n_latent >= {K}, got {guide.n_latent}")
    init = torch.full_like(guide.mask_logits, -float(logit))
    for i, pert in enumerate(gt["perturbations"]):
        row = data.spec.perturbations.index(pert)
        init[row, :K] = torch.where(torch.as_tensor(truth[i]), float(logit), -float(logit))
    with torch.no_grad():
        guide.mask_logits.copy_(init)


def task_train(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import pyro_perturb as pp
    import pyro_perturb.run as run_module

    bench = _benchmark_module()
    sets = bench._parse_sets(args.set)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        path = args.out / "runs" / f"{args.tag}_{args.model}_f{args.frac}_seed{seed}.json"
        if path.exists():
            print(f"{path.name}: exists, skipped", flush=True)
            continue
        adata = pp.simulate.combinatorial(seed=seed, frac_combinations_train=args.frac)
        data = pp.PerturbationData.from_anndata(adata, seed=seed)
        built = {}
        original_build = run_module.build

        def build_and_keep(*a, **k):  # keep the modules so the callback can look at them
            built["pair"] = original_build(*a, **k)
            if args.oracle_mask_init:
                _oracle_mask_init(built["pair"][1], data, adata, args.oracle_mask_init)
            return built["pair"]

        dynamics = []

        class _Run:  # what bench._targets needs while training
            pass

        def callback(epoch, row):
            if epoch % args.every:
                return
            r = _Run()
            r.model, r.guide, _ = built["pair"]
            r.spec = data.spec
            r.device = next(r.model.parameters()).device
            r.latents = lambda d: pp.run.Run.latents(r, d)
            r.encode = lambda d: d
            t = bench._targets(r, data, adata)
            entry = {"epoch": epoch, "val_loss": row["val_loss"], "target_f1": t.get("target_f1"),
                     "mcc": t["mcc"]}
            probs = getattr(r.guide, "mask_probabilities", None)
            if probs is not None:
                q = probs().cpu().numpy()
                entry["mask_on"] = float((q > 0.5).mean())
                entry["mask_undecided"] = float(((q > 0.1) & (q < 0.9)).mean())
            dynamics.append(entry)
            print(json.dumps(entry), flush=True)

        run_module.build = build_and_keep
        try:
            t0 = time.perf_counter()
            run = pp.fit(data, model=args.model, seed=seed, callback=callback, **sets)
            train_s = time.perf_counter() - t0
        finally:
            run_module.build = original_build
        res = {"tag": args.tag, "model": args.model, "seed": seed, "frac": args.frac, "sets": sets,
               "oracle_mask_init": args.oracle_mask_init,
               "epochs": len(run.history), "best_val": min(r["val_loss"] for r in run.history),
               "train_seconds": train_s}
        res.update(_evaluate(run, data, adata, args, seed, bench))
        res["dynamics"] = dynamics
        path.write_text(json.dumps(res, indent=1, default=float))
        print(f"{path.name}: " + json.dumps({k: v for k, v in res.items() if k != "dynamics"}, default=float), flush=True)
    return {}


# -------------------------------------------------------------------------- summarize
COLS = [("iwelbo_vs_default", "IWELBO - default (paired)"),
        ("true_test_ate_pearson", "ATE r held-out doubles vs true"),
        ("target_precision", "prec."), ("target_recall", "recall"), ("target_f1", "target F1"),
        ("mcc", "MCC"), ("axis_concentration", "axis conc."),
        ("ideal_mask_f1", "ideal-mask F1 (ceiling in learned basis)"),
        ("masks_per_true_target", "masks / true targets"), ("mask_undecided", "undecided"),
        ("basis_free_shift_r", "basis-free shift r"), ("basis_free_auroc", "basis-free AUROC"),
        ("basis_free_topk_f1", "basis-free top-k F1"), ("epochs", "epochs")]


def task_summarize(args) -> dict:
    import pandas as pd

    rows = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*.json"))]
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    # paired with the defaults on the same data (seed, frac): IWELBO levels differ by seed
    ref = df[(df.tag == "default") & (df.model == "sams_vae")].set_index(["frac", "seed"])["test_iwelbo"]
    df["iwelbo_vs_default"] = [r.test_iwelbo - ref.get((r.frac, r.seed), np.nan) for r in df.itertuples()]
    cols = [(c, n) for c, n in COLS if c in df.columns]
    lines = ["| setting | model | frac | seeds | " + " | ".join(n for _, n in cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for (tag, model, frac), sub in df.groupby(["tag", "model", "frac"], sort=True):
        cells = [tag, model, str(frac), ",".join(str(s) for s in sorted(sub.seed))]
        for c, _ in cols:
            v = pd.to_numeric(sub[c], errors="coerce").dropna()
            cells.append("n/a" if len(v) == 0 else f"{v.iloc[0]:.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    (args.out / "summary.md").write_text(md + "\n")
    df.drop(columns=["dynamics"], errors="ignore").to_csv(args.out / "summary.csv", index=False)
    print(md)
    return {}


TASKS = {"truth": task_truth, "scaling": task_scaling, "ceiling": task_ceiling, "train": task_train,
         "summarize": task_summarize}


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    result = TASKS[args.task](args)
    if result and args.task != "train":
        (args.out / f"{args.task}_f{args.frac}.json").write_text(json.dumps(result, indent=1, default=float))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="train")
    p.add_argument("--model", default="sams_vae")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--frac", type=float, default=0.5, help="frac_combinations_train of the simulator")
    p.add_argument("--tag", default="default", help="name of this setting (train)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="fit setting (train)")
    p.add_argument("--oracle-mask-init", type=float, default=0.0,
                   help="train: start the mask logits at +-this on the true targets (0: off)")
    p.add_argument("--every", type=int, default=10, help="epochs between dynamics records (train)")
    p.add_argument("--iwelbo-particles", type=int, default=30)
    p.add_argument("--ate-particles", type=int, default=500)
    p.add_argument("--ideal-threshold", type=float, default=0.3,
                   help="|true shift in the learned basis| above which the ideal mask is on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
