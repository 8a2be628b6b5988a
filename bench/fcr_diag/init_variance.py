"""Fit-to-fit spread of held-out-pair group-mean R^2 on ONE data set (factorized, data seed
DATA_SEED): same cells, only the model's initialisation / minibatch seed changes.
Usage: init_variance.py DATA_SEED MODEL SEED [SEED ...]; one JSON line per fit."""
import json, sys, time
import torch
import pyro_perturb as pp
from pyro_perturb.evaluate.groups import group_scores

torch.set_num_threads(1)
data_seed, model = int(sys.argv[1]), sys.argv[2]
adata = pp.simulate.factorized(seed=data_seed)
for seed in [int(s) for s in sys.argv[3:]]:
    t0 = time.perf_counter()
    run = pp.fit(adata, model=model, seed=seed, device="cpu", covariate_keys=["cell_line"])
    secs = time.perf_counter() - t0
    per_split, _, _ = group_scores(run, run.data, seed=seed, n_samples=1000, splits=("test",))
    t = per_split["test"]
    print(json.dumps({"data_seed": data_seed, "model": model, "seed": seed, "fit_s": round(secs, 1), "epochs": len(run.history),
                      "group_r2": round(t["group_r2"], 4), "group_r2_top20": round(t["group_r2_top20"], 4),
                      "per_group_r2": {g: round(v["r2"], 3) for g, v in t["groups"].items()},
                      "per_group_r2_top20": {g: round(v["r2_top20"], 3) for g, v in t["groups"].items()}}), flush=True)
