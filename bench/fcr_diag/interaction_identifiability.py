"""Is a held-out pair's true interaction g(c,t) predictable from the training pairs' g?

Fit the simulator's own architecture g = W2 lrelu(W1 (u_c * v_t) + b1) (u, v free embeddings
of size ``--dim``, hidden ``--hidden``) to the TRUE g of the 21 training pairs of
``factorized(seed)`` (perfect latent recovery assumed), ``--restarts`` restarts; score each
restart's held-out g through the true generator (group-mean R^2, 4,000 cells) and the
restarts' averaged g. Prints one JSON line per held-out pair (the "oracle-architecture fit"
columns of table 1 in ``bench/results/fcr_diagnosis.md``)::

    python bench/fcr_diag/interaction_identifiability.py --seeds 0 1 2 \\
        > bench/results/fcr_diag_identifiability.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceiling import gen_mean, lognorm  # noqa: E402


def fit(G: np.ndarray, mask: np.ndarray, dim: int, hidden: int, seed: int, wd: float = 0.0,
        steps: int = 3000) -> tuple[np.ndarray, float]:
    """Fit g(c, t) to ``G`` (lines x drugs x L_tx) on the pairs where ``mask`` is True;
    returns the fitted g for every pair and the final training MSE."""
    import torch

    torch.manual_seed(seed)
    C, T, L = G.shape
    u = torch.nn.Parameter(torch.randn(C, dim)); v = torch.nn.Parameter(torch.randn(T, dim))
    net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.LeakyReLU(0.2), torch.nn.Linear(hidden, L))
    opt = torch.optim.Adam([u, v, *net.parameters()], lr=1e-2, weight_decay=wd)
    Gt = torch.tensor(G, dtype=torch.float32); m = torch.tensor(mask)
    for _ in range(steps):
        pred = net(u[:, None, :] * v[None, :, :])
        loss = ((pred - Gt) ** 2)[m].mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return net(u[:, None, :] * v[None, :, :]).detach().numpy(), float(loss.detach())


def main(args: argparse.Namespace) -> None:
    import torch

    import pyro_perturb as pp
    from pyro_perturb.evaluate.metrics import group_r2

    torch.set_num_threads(1)
    for seed in args.seeds:
        a = pp.simulate.factorized(seed=seed)
        gt = a.uns["ground_truth"]
        X = np.asarray(a.X.todense()); L = lognorm(X); lib = X.sum(1)
        lines, drugs = list(gt["covariates"]), list(gt["perturbations"])
        A, B, G = gt["covariate_means"], gt["treatment_means"], gt["interaction_means"]
        cl = a.obs["cell_line"].astype(str).to_numpy(); pt = a.obs["perturbation"].astype(str).to_numpy()
        held = [(lines.index(p.split("|")[0]), drugs.index(p.split("|")[1])) for p in gt["heldout_pairs"]]
        mask = np.ones(G.shape[:2], bool)
        for ci, ti in held: mask[ci, ti] = False
        fits = [fit(G, mask, args.dim, args.hidden, r) for r in range(args.restarts)]
        rng = np.random.default_rng(7)
        for ci, ti in held:
            m = (cl == lines[ci]) & (pt == drugs[ti]); obs = L[m].mean(0)
            pool = lib[(cl == lines[ci])]
            r2s, errs = [], []
            for g_hat, loss in fits:
                pred = gen_mean(gt, A[ci], B[ti], g_hat[ci, ti], 4000, rng, pool)
                r2s.append(group_r2(obs, pred)); errs.append(float(np.linalg.norm(g_hat[ci, ti] - G[ci, ti])))
            avg = np.mean([f[0][ci, ti] for f in fits], 0)
            r2_avg = group_r2(obs, gen_mean(gt, A[ci], B[ti], avg, 4000, rng, pool))
            print(json.dumps({"dim": args.dim, "seed": seed, "pair": f"{lines[ci]}|{drugs[ti]}",
                              "train_mse": round(float(np.mean([f[1] for f in fits])), 4),
                              "|g|": round(float(np.linalg.norm(G[ci, ti])), 2),
                              "|g_hat-g| mean": round(float(np.mean(errs)), 2), "r2 restarts mean": round(float(np.mean(r2s)), 3),
                              "r2 restarts sd": round(float(np.std(r2s)), 3), "r2 min": round(min(r2s), 3), "r2 max": round(max(r2s), 3),
                              "r2 of restart-averaged g": round(r2_avg, 3)}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Prints one JSON line per held-out pair to stdout.")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="simulator seeds")
    p.add_argument("--dim", type=int, default=8, help="embedding size of u_c, v_t (the simulator's: 8)")
    p.add_argument("--hidden", type=int, default=64, help="hidden units (the simulator's: 64)")
    p.add_argument("--restarts", type=int, default=20)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
