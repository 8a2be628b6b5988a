"""Ceiling of held-out-pair group-mean R^2 on the factorized simulator with the TRUE generator,
and how much of it needs the interaction z_tx (is g(c,t) of a held-out pair predictable?).

For each seed's held-out (line, drug) pairs: the group-mean R^2 of 20,000 cells drawn from the
true generator with the true interaction mean g, with g = 0, with g averaged over the drug's
other lines or the line's other drugs, and with a two-way additive fit of g on the training
pairs; plus the line's control mean and a second 100-cell draw (the noise floor). Prints one
JSON line per held-out pair (table 1 of ``bench/results/fcr_diagnosis.md``)::

    python bench/fcr_diag/ceiling.py --seeds 0 1 2 > bench/results/fcr_diag_ceiling.jsonl
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def lognorm(counts: np.ndarray) -> np.ndarray:
    """log2(1 + 1e4-normalised counts), cells x genes."""
    return np.log2(1 + 1e4 * counts / counts.sum(1, keepdims=True))


def gen_mean(gt: dict, zx_mean: np.ndarray, zt_mean: np.ndarray, ztx_mean: np.ndarray, n: int,
             rng: np.random.Generator, lib_pool: np.ndarray) -> np.ndarray:
    """Mean log-normalised expression (genes,) of ``n`` cells drawn from the true generator
    with the given block means (unit-variance blocks) and library sizes drawn from ``lib_pool``."""
    from pyro_perturb.data.simulate import decoder_proportions

    lx, lt, ltx = len(zx_mean), len(zt_mean), len(ztx_mean)
    z = np.hstack([zx_mean + rng.standard_normal((n, lx)), zt_mean + rng.standard_normal((n, lt)),
                   ztx_mean + rng.standard_normal((n, ltx))])
    lib = rng.choice(lib_pool, n)
    mean = decoder_proportions(gt["decoder"], z) * lib[:, None]
    th = gt["theta"].astype(np.float64)
    counts = rng.poisson(rng.gamma(th, mean / th))
    return lognorm(counts.astype(float)).mean(0)


def main(args: argparse.Namespace) -> None:
    import pyro_perturb as pp
    from pyro_perturb.evaluate.metrics import de_genes, group_r2

    for seed in args.seeds:
        a = pp.simulate.factorized(seed=seed)
        gt = a.uns["ground_truth"]
        X = np.asarray(a.X.todense()) if hasattr(a.X, "todense") else np.asarray(a.X)
        L = lognorm(X)
        lib = X.sum(1)
        lines, drugs = list(gt["covariates"]), list(gt["perturbations"])
        A, B, G = gt["covariate_means"], gt["treatment_means"], gt["interaction_means"]
        cl = a.obs["cell_line"].astype(str).to_numpy(); pt = a.obs["perturbation"].astype(str).to_numpy()
        held = [tuple(p.split("|")) for p in gt["heldout_pairs"]]
        held_idx = {(lines.index(c), drugs.index(t)) for c, t in held}
        train_mask = np.ones(G.shape[:2], bool)
        for ci, ti in held_idx: train_mask[ci, ti] = False
        # two-way additive fit of g on the training pairs (per latent dim), least squares
        C, T, Ltx = G.shape
        rows = [(ci, ti) for ci in range(C) for ti in range(T) if train_mask[ci, ti]]
        D = np.zeros((len(rows), C + T))
        for k, (ci, ti) in enumerate(rows): D[k, ci] = 1; D[k, C + ti] = 1
        coef, *_ = np.linalg.lstsq(D, np.stack([G[ci, ti] for ci, ti in rows]), rcond=None)
        rng = np.random.default_rng(100 + seed)
        for c, t in held:
            ci, ti = lines.index(c), drugs.index(t)
            m = (cl == c) & (pt == t)
            obs = L[m].mean(0)
            ctrl = L[(cl == c) & (pt == "control")].mean(0)
            pool = lib[(cl == c) & (a.obs["split"].astype(str).to_numpy() != "test")]
            cands = {
                "true g (ceiling, 20k cells)": G[ci, ti],
                "g = 0": np.zeros(Ltx),
                "g = mean_c' g(c',t)": G[train_mask[:, ti], ti].mean(0),
                "g = mean_t' g(c,t')": G[ci, train_mask[ci]].mean(0),
                "g = two-way additive fit": coef[ci] + coef[C + ti],
            }
            res = {"seed": seed, "pair": f"{c}|{t}", "n_obs": int(m.sum()),
                   "|g|": float(np.linalg.norm(G[ci, ti])), "|b_t|": float(np.linalg.norm(B[ti])),
                   "ctrl_r2": group_r2(obs, ctrl), "ctrl_top20": group_r2(obs, ctrl, de_genes(obs, ctrl, 20))}
            # finite-sample noise: a second draw of n_obs cells from the true generator
            res["true g, 100 cells (noise floor)"] = group_r2(obs, gen_mean(gt, A[ci], B[ti], G[ci, ti], int(m.sum()), rng, pool))
            for name, g in cands.items():
                pred = gen_mean(gt, A[ci], B[ti], g, 20000, rng, pool)
                res[name] = group_r2(obs, pred)
                res[name + " top20"] = group_r2(obs, pred, de_genes(obs, ctrl, 20))
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Prints one JSON line per held-out pair to stdout.")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="simulator seeds")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
