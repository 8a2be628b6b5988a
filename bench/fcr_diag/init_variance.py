"""Fit-to-fit spread of held-out-pair group-mean R^2 on ONE data set.

``factorized(seed=--data-seed)`` is simulated once; ``--model`` is fitted at its registered
defaults once per ``--seeds`` entry: same cells, only the model's initialisation / minibatch
seed changes. Prints one JSON line per fit (table 3 of ``bench/results/fcr_diagnosis.md``)::

    python bench/fcr_diag/init_variance.py --data-seed 0 --model cvae --seeds 11 12 13 \\
        > bench/results/fcr_diag_init_variance.jsonl
    python bench/fcr_diag/init_variance.py --data-seed 0 --model fcr --seeds 11 12 13 \\
        >> bench/results/fcr_diag_init_variance.jsonl
"""
from __future__ import annotations

import argparse
import json
import time


def main(args: argparse.Namespace) -> None:
    import torch

    import pyro_perturb as pp
    from pyro_perturb.evaluate.groups import group_scores

    torch.set_num_threads(1)
    adata = pp.simulate.factorized(seed=args.data_seed)
    for seed in args.seeds:
        t0 = time.perf_counter()
        run = pp.fit(adata, model=args.model, seed=seed, device="cpu", covariate_keys=["cell_line"])
        secs = time.perf_counter() - t0
        per_split, _, _ = group_scores(run, run.data, seed=seed, n_samples=1000, splits=("test",))
        t = per_split["test"]
        print(json.dumps({"data_seed": args.data_seed, "model": args.model, "seed": seed, "fit_s": round(secs, 1),
                          "epochs": len(run.history),
                          "group_r2": round(t["group_r2"], 4), "group_r2_top20": round(t["group_r2_top20"], 4),
                          "per_group_r2": {g: round(v["r2"], 3) for g, v in t["groups"].items()},
                          "per_group_r2_top20": {g: round(v["r2_top20"], 3) for g, v in t["groups"].items()}}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Prints one JSON line per fit to stdout.")
    p.add_argument("--data-seed", type=int, default=0, help="simulator seed (the one data set)")
    p.add_argument("--model", default="fcr", help="registered model name")
    p.add_argument("--seeds", nargs="+", type=int, default=[11, 12, 13], help="model seeds, one fit each")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
