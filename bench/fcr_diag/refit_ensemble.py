"""Ensemble of independently trained FCRs (or cVAEs) on one data set.

``--model`` is fitted on ``factorized(seed=--data-seed)`` once per ``--seeds`` entry; prints
the held-out group-mean R^2 (all genes, top-20 DE) of each fit and of the fits' averaged
group means (log-normalised space), one JSON line each (table 4 of
``bench/results/fcr_diagnosis.md``)::

    python bench/fcr_diag/refit_ensemble.py --data-seed 0 --model fcr --seeds 0 11 12 13 \\
        > bench/results/fcr_diag_refit_ensemble.jsonl
    python bench/fcr_diag/refit_ensemble.py --data-seed 2 --model fcr --seeds 2 21 22 23 \\
        >> bench/results/fcr_diag_refit_ensemble.jsonl
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def main(args: argparse.Namespace) -> None:
    import torch

    import pyro_perturb as pp
    from pyro_perturb.evaluate.groups import group_scores
    from pyro_perturb.evaluate.metrics import de_genes, group_r2

    torch.set_num_threads(1)
    adata = pp.simulate.factorized(seed=args.data_seed)
    held = list(adata.uns["ground_truth"]["heldout_pairs"])
    tables, data_table = [], None
    for seed in args.seeds:
        run = pp.fit(adata, model=args.model, seed=seed, device="cpu", covariate_keys=["cell_line"])
        _, model_table, data_table = group_scores(run, run.data, seed=seed, n_samples=1000, splits=("test",))
        tables.append(model_table)

    def scores(pred_table) -> dict[str, tuple[float, float]]:
        """(R^2 all genes, R^2 top-20 DE) per held-out pair of a table of predicted group means."""
        out = {}
        for pair in held:
            line = pair.split("|")[0]
            obs, ctrl = data_table.loc[pair].to_numpy(float), data_table.loc[f"{line}|control"].to_numpy(float)
            pred = pred_table.loc[pair].to_numpy(float)
            out[pair] = (round(group_r2(obs, pred), 3), round(group_r2(obs, pred, de_genes(obs, ctrl, 20)), 3))
        return out

    def line(fit: str, s: dict) -> str:
        return json.dumps({"data_seed": args.data_seed, "model": args.model, "fit": fit,
                           "r2": round(float(np.mean([v[0] for v in s.values()])), 4),
                           "r2_top20": round(float(np.mean([v[1] for v in s.values()])), 4), "per_group": s})

    for seed, t in zip(args.seeds, tables):
        print(line(str(seed), scores(t)), flush=True)
    print(line("mean of " + ",".join(str(s) for s in args.seeds), scores(sum(tables) / len(tables))), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Prints one JSON line per fit and one for the ensemble to stdout.")
    p.add_argument("--data-seed", type=int, default=0, help="simulator seed (the one data set)")
    p.add_argument("--model", default="fcr", help="registered model name")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 11, 12, 13], help="model seeds, one fit each")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
