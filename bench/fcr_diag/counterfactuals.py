"""How FCR's held-out-pair counterfactual is formed, and what limits it (factorized simulator).

Fits FCR at the registered defaults (plus ``--set`` overrides) on one seed, then scores each
held-out pair's group mean (all genes / top-20 DE) under variants of where the three blocks
come from:

* ``prior``: all three from the conditional priors (what evaluate does);
* ``abduct_x``: z_x = posterior draws of that line's control training cells; z_t, z_tx prior;
* ``abduct_xt``: also z_t = posterior draws of drug-t training cells of the other lines;
* ``ztx_none``: priors, but z_tx from the prior of "no interaction" (mix = 0, i.e. a control);
* ``ztx_rowmean``: priors, but z_tx from the line's own z_tx prior means averaged over its
  training drugs (the analogue of "g = mean_t' g(c,t')");
* ``ztx_colmean``: priors, z_tx prior mean averaged over the drug's training lines.

Prints one JSON line per held-out pair to stdout (the fit's time and epochs go to stderr);
table 2 of ``bench/results/fcr_diagnosis.md``::

    python bench/fcr_diag/counterfactuals.py --seed 0 --set n_interaction_heads=5 \\
        > bench/results/fcr_diag_counterfactuals_heads5_seed0.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

N_CELLS = 2000  # cells drawn per counterfactual group


def post_draws(run, idx: np.ndarray, n: int, gen) -> dict:
    """``n`` draws of every block from the guide's posterior of randomly picked cells ``idx``."""
    import torch

    b = run.data.batch(np.sort(idx))
    post = run.guide.posterior(b)
    pick = torch.randint(len(idx), (n,), generator=gen)
    return {k: (loc[pick] + scale[pick] * torch.randn(loc[pick].shape, generator=gen)) for k, (loc, scale) in post.items()}


def prior_draws(run, lines: list[str], line: str, label: str, n: int, libs: np.ndarray, gen):
    """A request batch of ``n`` cells of (line, label), one draw of each block from the
    conditional priors, and the priors' (loc, scale) per block."""
    import torch

    b = run.spec.request_batch([label] * n, libs, (lines.index(line),))
    pr = run.model.prior_params(b)
    return b, {k: loc + scale * torch.randn(loc.shape, generator=gen) for k, (loc, scale) in pr.items()}, pr


def decode_mean(run, b, z: dict) -> np.ndarray:
    """Mean log-normalised expression (genes,) of counts decoded from the blocks ``z``."""
    import torch
    from pyro import poutine

    from pyro_perturb.normalize import lognormalize

    with torch.no_grad():
        tr = poutine.trace(poutine.condition(run.model, data=z)).get_trace(b, observe=False)
    return lognormalize(tr.nodes["x"]["value"]).double().mean(0).numpy()


def main(args: argparse.Namespace) -> None:
    import pyro
    import torch

    import pyro_perturb as pp
    from pyro_perturb.cli import _parse_sets
    from pyro_perturb.evaluate.metrics import de_genes, group_r2

    torch.set_num_threads(1)
    seed, overrides = args.seed, _parse_sets(args.set)
    adata = pp.simulate.factorized(seed=seed)
    t0 = time.perf_counter()
    run = pp.fit(adata, model="fcr", seed=seed, device="cpu", covariate_keys=["cell_line"], **overrides)
    print(json.dumps({"fit_s": round(time.perf_counter() - t0, 1), "epochs": len(run.history), "overrides": overrides}),
          file=sys.stderr, flush=True)
    model = run.model
    model.eval(); run.guide.eval()
    cl = adata.obs["cell_line"].astype(str).to_numpy(); pt = adata.obs["perturbation"].astype(str).to_numpy()
    split = adata.obs["split"].astype(str).to_numpy()
    X = np.asarray(adata.X.todense()); L = np.log2(1 + 1e4 * X / X.sum(1, keepdims=True)); lib = X.sum(1)
    lines = list(run.spec.covariate_categories[0])
    gen = torch.Generator().manual_seed(seed)

    with torch.no_grad():
        pyro.set_rng_seed(seed)
        for pair in adata.uns["ground_truth"]["heldout_pairs"]:
            line, drug = pair.split("|")
            m = (cl == line) & (pt == drug); obs = L[m].mean(0)
            ctrl = L[(cl == line) & (pt == "control")].mean(0); top = de_genes(obs, ctrl, 20)
            libs = np.random.default_rng(seed).choice(lib[(cl == line) & (split == "train")], N_CELLS)
            b, z, pr = prior_draws(run, lines, line, drug, N_CELLS, libs, gen)
            variants = {"prior": dict(z)}
            zx_ab = post_draws(run, np.flatnonzero((cl == line) & (pt == "control") & (split == "train")), N_CELLS, gen)["z_x"]
            variants["abduct_x"] = {**z, "z_x": zx_ab}
            zt_ab = post_draws(run, np.flatnonzero((cl != line) & (pt == drug) & (split == "train")), N_CELLS, gen)["z_t"]
            variants["abduct_xt"] = {**z, "z_x": zx_ab, "z_t": zt_ab}
            _, _, pr_ctrl = prior_draws(run, lines, line, "control", N_CELLS, libs, gen)
            loc, scale = pr_ctrl["z_tx"]
            variants["ztx_none"] = {**z, "z_tx": loc + scale * torch.randn(loc.shape, generator=gen)}
            train_drugs = sorted({p for p in pt[(cl == line) & (split == "train")] if p not in ("control", drug)})
            row = torch.stack([prior_draws(run, lines, line, d2, 1, libs[:1], gen)[2]["z_tx"][0][0] for d2 in train_drugs]).mean(0)
            variants["ztx_rowmean"] = {**z, "z_tx": row + pr["z_tx"][1] * torch.randn(pr["z_tx"][1].shape, generator=gen)}
            train_lines = sorted({c for c in cl[(pt == drug) & (split == "train")] if c != line})
            col = torch.stack([prior_draws(run, lines, c2, drug, 1, libs[:1], gen)[2]["z_tx"][0][0] for c2 in train_lines]).mean(0)
            variants["ztx_colmean"] = {**z, "z_tx": col + pr["z_tx"][1] * torch.randn(pr["z_tx"][1].shape, generator=gen)}
            res = {"seed": seed, "pair": pair}
            for name, zz in variants.items():
                pred = decode_mean(run, b, zz)
                res[name] = round(group_r2(obs, pred), 3); res[name + "_top20"] = round(group_r2(obs, pred, top), 3)
            # where the held-out prior mean of z_tx lies relative to the training pairs' ones
            res["|ztx_prior - rowmean|"] = round(float((pr["z_tx"][0][0] - row).norm()), 2)
            res["|ztx_prior - none|"] = round(float((pr["z_tx"][0][0] - pr_ctrl["z_tx"][0][0]).norm()), 2)
            res["ztx prior scale"] = round(float(pr["z_tx"][1][0].mean()), 3)
            print(json.dumps(res), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Prints one JSON line per held-out pair to stdout.")
    p.add_argument("--seed", type=int, default=0, help="simulator and model seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="FCR hyperparameter or training setting (repeatable), e.g. n_interaction_heads=5")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
