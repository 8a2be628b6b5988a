"""Figure of bench/results/fcr_diagnosis.md: held-out-pair R^2 (all genes) per pair, for the
true generator, the oracle-architecture interaction fits, FCR fits and the baselines.

Reads ``fcr_diag_ceiling.jsonl``, ``fcr_diag_identifiability.jsonl``,
``fcr_diag_init_variance.jsonl`` and ``fcr_sim.csv`` from ``--results``::

    python bench/fcr_diag/plot.py          # writes bench/results/fcr_diagnosis.png
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = Path(args.results)
    cei = [json.loads(l) for l in open(R / "fcr_diag_ceiling.jsonl")]
    ide = {(r["seed"], r["pair"]): r for r in map(json.loads, open(R / "fcr_diag_identifiability.jsonl"))}
    ivar = [json.loads(l) for l in open(R / "fcr_diag_init_variance.jsonl")]
    sim = list(csv.DictReader(open(R / "fcr_sim.csv")))
    pairs = [(r["seed"], r["pair"]) for r in cei]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    style = {"cvae": ("tab:blue", "s"), "cpa_vae": ("tab:cyan", "D"), "fcr": ("tab:red", "o"),
             "fcr[no-reg]": ("salmon", "o"), "fcr[heads5]": ("darkred", "^")}
    for k, (seed, pair) in enumerate(pairs):
        c, i = cei[k], ide[(seed, pair)]
        ax.errorbar(k - 0.3, i["r2 restarts mean"], yerr=i["r2 restarts sd"], fmt="o", color="gray", capsize=3,
                    label="oracle-architecture fit (mean ± sd, 20 restarts)" if k == 0 else None)
        ax.scatter(k - 0.3, i["r2 of restart-averaged g"], marker="*", s=80, color="k", label="mean of the 20 oracle fits' g" if k == 0 else None)
        ax.scatter(k - 0.2, c["true g (ceiling, 20k cells)"], marker="_", s=200, color="green", label="true generator" if k == 0 else None)
        ax.scatter(k - 0.2, c["g = 0"], marker="x", color="green", label="true generator, g = 0" if k == 0 else None)
        for j, (model, (col, mk)) in enumerate(style.items()):
            for r in sim:
                if r["model"] == model and int(r["seed"]) == seed and r.get("per_group_r2"):
                    v = json.loads(r["per_group_r2"]).get(pair)
                    if v is not None:
                        ax.scatter(k - 0.05 + 0.08 * j, v, color=col, marker=mk, s=30, label=model if k == 0 else None)
        for r in ivar:
            if r["data_seed"] == seed and pair in r["per_group_r2"]:
                col, mk = style[r["model"]]
                ax.scatter(k - 0.05 + 0.08 * list(style).index(r["model"]), r["per_group_r2"][pair], facecolors="none",
                           edgecolors=col, marker=mk, s=30)
    ax.set_xticks(range(len(pairs)), [f"s{s}\n{p}" for s, p in pairs], fontsize=8)
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("held-out group R² (all genes)")
    ax.set_title("factorized simulator: held-out pairs (open markers: refits with other model seeds, data seed 0)", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="folder with the diagnosis' JSONL files and fcr_sim.csv")
    p.add_argument("--out", default=str(RESULTS / "fcr_diagnosis.png"), help="PNG to write")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
