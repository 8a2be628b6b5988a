"""NODAGS-Flow on its paper's synthetic setting (docs/models.md, "NODAGS-Flow").

Protocol: for each graph size (10 and 20 genes), mechanism (linear, nonlinear) and seed,
``cyclic_graph`` draws a cyclic Erdos-Renyi graph (expected out-degree 2, weights
+-U(0.2, 0.8), ``||W||_2 < 1``), knocks down every gene in its own cells, adds controls and
a few held-out double knockdowns (test split), and turns the SEM values into counts (with a
``background`` gene holding 90% of the counts, see the simulator). ``nodags`` is trained
with its registry defaults (``--set`` overrides them), then:

* edge recovery over the graph's genes (the background gene left out: it is no node of the
  simulated graph; in log-normalised space it is a parent of every gene through the
  normalisation): AUPRC of the learned edge strengths, and SHD / precision / recall / F1 of
  the edges whose strength exceeds ``--threshold``; beside chance (AUPRC = edge density;
  SHD of the empty graph = number of true edges) and the regression baseline
  (``regression_baseline_scores``: each gene regressed on the others over the cells where
  it is not targeted, |standardised ridge coefficients|; given the graph's genes only,
  without the background gene, whose closure relation with the others would otherwise
  swamp it); also NODAGS's AUPRC over all genes;
* interventional NLL (I-NLL, nats per cell, on ``log1p(1e4 x / l)``) on the test split
  (held-out cells of seen knockdowns, and the unseen doubles alone): ``nodags``'s held-out
  IWELBO, beside the no-edge baseline (independent Gaussians per gene fitted on the
  training cells where the gene is not targeted; targeted genes dropped, as in the model).

Each run's JSON goes to ``OUT/runs/`` as soon as it is done (a re-run skips finished ones);
the table of means and standard deviations over seeds to ``OUT/README.md`` (with the
command, date and machine) and ``OUT/summary.csv``.

Usage::

    python bench/graph_nodags.py                 # 10 and 20 genes, linear and nonlinear, 3 seeds
    python bench/graph_nodags.py --quick         # 10 genes, linear, 1 seed, short training
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def no_edge_inll(y_train: np.ndarray, targeted_train: np.ndarray, y_test: np.ndarray, targeted_test: np.ndarray) -> np.ndarray:
    """Per-cell I-NLL ``(n_test,)`` of independent per-gene Gaussians (fitted on the training
    cells where the gene is not targeted); targeted genes are left out, as in the model."""
    weights = ~targeted_train
    mean = (y_train * weights).sum(0) / weights.sum(0)
    var = (((y_train - mean) ** 2) * weights).sum(0) / weights.sum(0)
    nll = 0.5 * (np.log(2 * np.pi * var) + (y_test - mean) ** 2 / var)
    return (nll * ~targeted_test).sum(1)


def _targeted(adata, genes: list[str]) -> np.ndarray:
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    parts = [set(label.split("+")) for label in labels]
    return np.array([[g in p for g in genes] for p in parts])


def regression_metrics(adata, n_genes: int) -> dict:
    """The regression baseline's AUPRC and top-k SHD / F1 on the training cells of the
    graph's genes (its scores are not on the model's scale, so its edges are its top k,
    k = true edges: a cut that favours it)."""
    import torch

    from pyro_perturb.evaluate.graph_metrics import graph_metrics, regression_baseline_scores
    from pyro_perturb.normalize import log1p_normalize

    x = adata.X.toarray()
    y = log1p_normalize(torch.as_tensor(x), torch.as_tensor(x.sum(1))).numpy()[:, :n_genes]
    targeted = _targeted(adata, list(adata.var_names))[:, :n_genes]
    train = adata.obs["split"].astype(str).to_numpy() == "train"
    scores = regression_baseline_scores(y[train], targeted[train])
    truth = adata.varp["true_adjacency"][:n_genes, :n_genes]
    off = ~np.eye(n_genes, dtype=bool)
    k = int((truth != 0).sum())
    called = (scores >= np.sort(scores[off])[-k]) & off
    topk = graph_metrics(truth, called.astype(float), 0.5)
    return {"regression_auprc": graph_metrics(truth, scores, np.inf)["auprc"], "regression_shd_topk": topk["shd"],
            "regression_f1_topk": topk["f1"], "regression_graph_genes_only": True}


def run_one(n_genes: int, mechanism: str, seed: int, settings: dict, threshold: float, cells: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import pyro_perturb as pp
    from pyro_perturb import contract
    from pyro_perturb.data.simulate_cyclic import cyclic_graph
    from pyro_perturb.evaluate.graph_metrics import edge_auprc, graph_metrics
    from pyro_perturb.normalize import log1p_normalize

    adata = cyclic_graph(seed=seed, n_genes=n_genes, mechanism=mechanism, cells_per_perturbation=cells,
                         n_control_cells=2 * cells, n_doubles=5)
    data = pp.PerturbationData.from_anndata(adata)
    start = time.perf_counter()
    run = pp.fit(data, model="nodags", progress=False, device="cpu", seed=seed, **settings)
    seconds = time.perf_counter() - start
    truth_all = adata.varp["true_adjacency"]
    truth = truth_all[:n_genes, :n_genes]
    learned_all = contract.adjacency(run.model).weights
    learned = learned_all[:n_genes, :n_genes]

    genes = list(adata.var_names)
    x = adata.X.toarray()
    library = x.sum(1)
    y = log1p_normalize(torch.as_tensor(x), torch.as_tensor(library)).numpy()
    targeted = _targeted(adata, genes)
    split = adata.obs["split"].astype(str).to_numpy()
    train = split == "train"

    out = {"n_genes": n_genes, "mechanism": mechanism, "seed": seed, "seconds": seconds,
           "epochs": len(run.history), "edge_density": float((truth != 0)[~np.eye(n_genes, dtype=bool)].mean()),
           "n_edges_true": int((truth != 0).sum())}
    metrics = graph_metrics(truth, learned, threshold)
    out["nodags_auprc"] = metrics["auprc"]
    out.update({f"nodags_{k}": metrics[k] for k in ("shd", "precision", "recall", "f1", "n_edges_pred")})
    k = out["n_edges_true"]
    off = ~np.eye(n_genes, dtype=bool)
    cut = np.sort(learned[off])[-k] if k else np.inf
    out["nodags_f1_topk"] = graph_metrics(truth, ((learned >= cut) & off).astype(float), 0.5)["f1"]
    out["nodags_auprc_all_genes"] = edge_auprc(truth_all, learned_all)
    out["chance_shd"] = k
    out.update(regression_metrics(adata, n_genes))

    per_cell = -run.iwelbo(data, "test", num_particles=1)
    test_idx = data.indices("test")
    doubles = np.array(["+" in str(adata.obs["perturbation"].iloc[i]) for i in test_idx])
    baseline_nll = no_edge_inll(y[train], targeted[train], y[test_idx], targeted[test_idx])
    out.update({
        "inll_nodags": float(per_cell.mean()), "inll_no_edge": float(baseline_nll.mean()),
        "inll_nodags_doubles": float(per_cell[doubles].mean()) if doubles.any() else None,
        "inll_no_edge_doubles": float(baseline_nll[doubles].mean()) if doubles.any() else None,
    })
    return out


def run_other(model: str, n_genes: int, mechanism: str, seed: int, threshold: float, cells: int) -> dict:
    """Another gene-graph model of the zoo (e.g. ``dcdfg``, a DAG model) on the same data,
    at its registry defaults: AUPRC, SHD / F1 (its edge probabilities > 0.5, else
    strengths > ``threshold``), top-k F1 and test I-NLL."""
    import torch

    torch.set_num_threads(1)
    import pyro_perturb as pp
    from pyro_perturb import contract
    from pyro_perturb.data.simulate_cyclic import cyclic_graph
    from pyro_perturb.evaluate.graph_metrics import graph_metrics

    adata = cyclic_graph(seed=seed, n_genes=n_genes, mechanism=mechanism, cells_per_perturbation=cells,
                         n_control_cells=2 * cells, n_doubles=5)
    data = pp.PerturbationData.from_anndata(adata)
    start = time.perf_counter()
    run = pp.fit(data, model=model, progress=False, device="cpu", seed=seed)
    seconds = time.perf_counter() - start
    truth = adata.varp["true_adjacency"][:n_genes, :n_genes]
    graph = contract.adjacency(run.model)
    learned = graph.weights[:n_genes, :n_genes]
    metrics = graph_metrics(truth, learned, 0.5 if graph.is_probability else threshold)
    off = ~np.eye(n_genes, dtype=bool)
    k = int((truth != 0).sum())
    cut = np.sort(learned[off])[-k]
    topk = graph_metrics(truth, ((learned >= cut) & off).astype(float), 0.5)
    return {"model": model, "n_genes": n_genes, "mechanism": mechanism, "seed": seed, "seconds": seconds,
            "auprc": metrics["auprc"], "shd": metrics["shd"], "f1": metrics["f1"], "f1_topk": topk["f1"],
            "inll": float(-run.iwelbo(data, "test", num_particles=1).mean())}


COLUMNS = [
    ("nodags_auprc", "NODAGS AUPRC"), ("regression_auprc", "regression AUPRC"), ("edge_density", "chance AUPRC"),
    ("nodags_shd", "NODAGS SHD"), ("regression_shd_topk", "regression SHD (top-k)"), ("chance_shd", "empty-graph SHD"),
    ("nodags_f1", "NODAGS F1"), ("nodags_f1_topk", "NODAGS F1 (top-k)"), ("regression_f1_topk", "regression F1 (top-k)"),
    ("nodags_auprc_all_genes", "NODAGS AUPRC, all genes"),
    ("inll_nodags", "I-NLL test, NODAGS"), ("inll_no_edge", "I-NLL test, no-edge"),
    ("inll_nodags_doubles", "I-NLL unseen doubles, NODAGS"), ("inll_no_edge_doubles", "I-NLL unseen doubles, no-edge"),
    ("epochs", "epochs"), ("seconds", "train s"),
]


def _other_table(others: list[dict]) -> str:
    groups: dict = {}
    for row in others:
        groups.setdefault((row["model"], row["n_genes"], row["mechanism"]), []).append(row)
    keys = [("auprc", "AUPRC"), ("shd", "SHD"), ("f1", "F1"), ("f1_topk", "F1 (top-k)"), ("inll", "I-NLL test"),
            ("seconds", "train s")]
    lines = ["| model | genes | SEM | seeds | " + " | ".join(label for _, label in keys) + " |",
             "|" + " --- |" * (4 + len(keys))]
    for (model, n, mech), items in sorted(groups.items()):
        cells = []
        for key, _ in keys:
            v = np.array([r[key] for r in items], dtype=float)
            cells.append(f"{v.mean():.3g} ± {v.std(ddof=1):.2g}" if len(v) > 1 else f"{v.mean():.3g}")
        lines.append(f"| {model} | {n} | {mech} | {len(items)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(rows: list[dict], out: Path, command: str, threshold: float, others: list[dict] | None = None) -> str:
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["n_genes"], row["mechanism"]), []).append(row)
    header = "| genes | SEM | seeds | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (3 + len(COLUMNS))]
    csv = ["n_genes,mechanism,seeds," + ",".join(f"{k}_mean,{k}_sd" for k, _ in COLUMNS)]
    for (n, mech), items in sorted(groups.items()):
        cells, values = [], []
        for key, _ in COLUMNS:
            v = np.array([r[key] for r in items if r.get(key) is not None], dtype=float)
            mean, sd = (v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0) if len(v) else (np.nan, np.nan)
            cells.append(f"{mean:.3g} ± {sd:.2g}" if len(v) > 1 else f"{mean:.3g}")
            values += [f"{mean:.6g}", f"{sd:.6g}"]
        lines.append(f"| {n} | {mech} | {len(items)} | " + " | ".join(cells) + " |")
        csv.append(f"{n},{mech},{len(items)}," + ",".join(values))
    (out / "summary.csv").write_text("\n".join(csv) + "\n")
    table = "\n".join(lines)
    other_text = ""
    if others:
        other_text = ("Other gene-graph models of the zoo on the same data, at their registry defaults "
                      "(graph genes; SHD / F1 of edge probabilities > 0.5):\n\n" + _other_table(others) + "\n")
    figure_text = "".join(f"\n![true and learned graph]({path.name})\n" for path in sorted(out.glob("adjacency_*.png")))
    text = f"""# NODAGS-Flow on cyclic graphs (bench/graph_nodags.py)

Command: `{command}`
Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch CPU.
Mean ± sd over seeds. Edge metrics over the graph's genes; SHD / F1 of NODAGS at edge
strength > {threshold} (the strength bounds |dF_j / ds_i| in standard deviations); the
regression baseline's SHD / F1 at its top-k edges (k = true edges), which favours it. I-NLL
in nats per cell on log1p(1e4 x / l) (lower is better), test split; "unseen doubles":
the held-out double knockdowns only.

{table}

{other_text}{figure_text}
Raw per-run results: `runs/*.json`; this table: `summary.csv`.

## Setting, and the paper

The paper's synthetic protocol (Sethuraman et al. 2023, section 5.1; its data generator in
the public code): cyclic Erdos-Renyi graphs of 10 and 20 nodes, expected out-degree 2,
weights +-U(0.2, 0.8) scaled to a contraction, noise sd 0.5, linear and nonlinear SEMs, an
intervention on every node, 5,000 samples per intervention, NODAGS-Flow with Lipschitz
constant 0.9 and an L1 penalty, evaluated by SHD and AUPRC against LLC, NOTEARS, DCDI and
others. Its results are box plots; no numeric table of them was available to us, so the
paper's numbers are not quoted beside ours. Differences here: the SEM values are seen
through counts (`counts_from_sem`, Poisson, ~2e4 counts per cell, 90% of them on a
background gene) and `log1p(1e4 x / l)`, not directly; interventions are knockdowns
(`c ~ N(-2, 0.5^2)`) instead of N(0, 1) values; 200 cells per knockdown instead of 5,000;
the nonlinear SEM is `tanh(v W + b)`.
"""
    (out / "README.md").write_text(text)
    return table


def adjacency_figure(out: Path, n_genes: int, mechanism: str, seed: int, settings: dict, cells: int) -> Path:
    """True graph beside NODAGS's learned edge strengths (one fit), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    torch.set_num_threads(1)
    import pyro_perturb as pp
    from pyro_perturb import contract
    from pyro_perturb.data.simulate_cyclic import cyclic_graph

    adata = cyclic_graph(seed=seed, n_genes=n_genes, mechanism=mechanism, cells_per_perturbation=cells,
                         n_control_cells=2 * cells, n_doubles=5)
    run = pp.fit(pp.PerturbationData.from_anndata(adata), model="nodags", progress=False, device="cpu", seed=seed,
                 **settings)
    truth = adata.varp["true_adjacency"]
    learned = contract.adjacency(run.model).weights
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, matrix, title in ((axes[0], truth, "true W (i -> j)"), (axes[1], learned, "NODAGS edge strength")):
        image = ax.imshow(matrix, cmap="RdBu_r" if matrix is truth else "viridis",
                          vmin=-np.abs(matrix).max() if matrix is truth else 0, vmax=np.abs(matrix).max())
        ax.set_title(title)
        ax.set_xlabel("target gene j")
        ax.set_ylabel("source gene i")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"cyclic graph, {n_genes} genes + background, {mechanism} SEM, seed {seed}")
    fig.tight_layout()
    path = out / f"adjacency_g{n_genes}_{mechanism}_seed{seed}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args) -> None:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    settings = {k: ast.literal_eval(v) if v[:1].isdigit() or v[:1] in "-[{(" or v in ("True", "False", "None") else v
                for k, v in (item.split("=", 1) for item in args.set or [])}
    if args.quick:
        args.sizes, args.mechanisms, args.seeds = [10], ["linear"], [0]
        settings.setdefault("max_epochs", 30)
    rows = []
    for n_genes in args.sizes:
        for mechanism in args.mechanisms:
            for seed in args.seeds:
                path = out / "runs" / f"g{n_genes}_{mechanism}_seed{seed}.json"
                if path.exists() and not args.force:
                    row = json.loads(path.read_text())
                    if not row.get("regression_graph_genes_only"):  # an earlier baseline: redo it (no training)
                        from pyro_perturb.data.simulate_cyclic import cyclic_graph

                        adata = cyclic_graph(seed=seed, n_genes=n_genes, mechanism=mechanism,
                                             cells_per_perturbation=args.cells, n_control_cells=2 * args.cells, n_doubles=5)
                        row.update(regression_metrics(adata, n_genes))
                        path.write_text(json.dumps(row, indent=1))
                    rows.append(row)
                    continue
                row = run_one(n_genes, mechanism, seed, settings, args.threshold, args.cells)
                row["settings"] = settings
                path.write_text(json.dumps(row, indent=1))
                print(json.dumps({k: row[k] for k in ("n_genes", "mechanism", "seed", "nodags_auprc", "regression_auprc",
                                                      "edge_density", "nodags_shd", "inll_nodags", "inll_no_edge")}), flush=True)
                rows.append(row)
    done = set()
    others = []
    for model in args.others:
        for n_genes in args.sizes:
            for mechanism in args.mechanisms:
                for seed in args.seeds:
                    path = out / "runs" / f"g{n_genes}_{mechanism}_seed{seed}_{model}.json"
                    if path.exists() and not args.force:
                        others.append(json.loads(path.read_text()))
                        continue
                    row = run_other(model, n_genes, mechanism, seed, args.threshold, args.cells)
                    path.write_text(json.dumps(row, indent=1))
                    print(json.dumps(row), flush=True)
                    others.append(row)
                    done.add(path.name)
    # other models' runs of earlier invocations are summarised too
    for path in sorted((out / "runs").glob("*.json")):
        row = json.loads(path.read_text())
        if "model" in row and path.name not in done and row not in others:
            others.append(row)
    if args.figure:
        print("figure:", adjacency_figure(out, args.sizes[0], args.mechanisms[0], args.seeds[0], settings, args.cells))
    command = "python bench/graph_nodags.py " + " ".join(sys.argv[1:])
    print(summarize(rows, out, command, args.threshold, others))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 20], help="graph sizes (genes)")
    p.add_argument("--mechanisms", nargs="+", default=["linear", "nonlinear"], choices=["linear", "nonlinear"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cells", type=int, default=200, help="cells per knockdown (controls: twice as many)")
    p.add_argument("--threshold", type=float, default=0.1, help="edge strength above which NODAGS calls an edge")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training setting or hyperparameter of nodags")
    p.add_argument("--others", nargs="*", default=[], help="other gene-graph models to run on the same data (e.g. dcdfg)")
    p.add_argument("--figure", action="store_true",
                   help="also fit the first size / mechanism / seed once more and draw its true and learned graphs")
    p.add_argument("--quick", action="store_true", help="10 genes, linear, seed 0, 30 epochs")
    p.add_argument("--force", action="store_true", help="re-run finished runs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "graph_nodags"))
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
