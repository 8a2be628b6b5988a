"""Ensemble of independently trained FCRs (or cVAEs) on one data set: held-out group-mean R^2
of each fit and of the fits' averaged group means (log-normalised space).
Usage: refit_ensemble.py DATA_SEED MODEL SEED [SEED ...]; prints JSON lines."""
import json, sys
import numpy as np
import torch
import pyro_perturb as pp
from pyro_perturb.evaluate.groups import group_scores
from pyro_perturb.evaluate.metrics import de_genes, group_r2

torch.set_num_threads(1)
data_seed, model = int(sys.argv[1]), sys.argv[2]
adata = pp.simulate.factorized(seed=data_seed)
held = list(adata.uns["ground_truth"]["heldout_pairs"])
tables, data_table = [], None
for seed in [int(s) for s in sys.argv[3:]]:
    run = pp.fit(adata, model=model, seed=seed, device="cpu", covariate_keys=["cell_line"])
    _, model_table, data_table = group_scores(run, run.data, seed=seed, n_samples=1000, splits=("test",))
    tables.append(model_table)


def scores(pred_table):
    out = {}
    for pair in held:
        line = pair.split("|")[0]
        obs, ctrl = data_table.loc[pair].to_numpy(float), data_table.loc[f"{line}|control"].to_numpy(float)
        pred = pred_table.loc[pair].to_numpy(float)
        out[pair] = (round(group_r2(obs, pred), 3), round(group_r2(obs, pred, de_genes(obs, ctrl, 20)), 3))
    return out


for seed, t in zip(sys.argv[3:], tables):
    s = scores(t)
    print(json.dumps({"data_seed": data_seed, "model": model, "fit": seed, "r2": round(float(np.mean([v[0] for v in s.values()])), 4),
                      "r2_top20": round(float(np.mean([v[1] for v in s.values()])), 4), "per_group": s}), flush=True)
s = scores(sum(tables) / len(tables))
print(json.dumps({"data_seed": data_seed, "model": model, "fit": "mean of " + ",".join(sys.argv[3:]),
                  "r2": round(float(np.mean([v[0] for v in s.values()])), 4),
                  "r2_top20": round(float(np.mean([v[1] for v in s.values()])), 4), "per_group": s}), flush=True)
