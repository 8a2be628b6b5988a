"""DCD-FG on the causal-DAG simulator: edge recovery against chance and a regression
baseline, held-out interventional NLL against a no-edge baseline, and training speed.

Accuracy (``--task accuracy``): the DCD-FG paper's synthetic setting, scaled to this
machine: a low-rank factor DAG over G genes and 10 factors (``p_gene_to_factor=0.2``,
``p_factor_to_gene=0.1``, the paper's ``p_module`` / ``p_vertex``), linear or nonlinear
(MLP) mechanisms, one knockout per gene, 20% of the knockouts held out (test). The paper
uses G = 100 and 50,000 cells; the default here is G = 100 with 50 cells per knockout and
500 controls (5,500 cells), 3 seeds. DCD-FG (linear and MLP conditionals, registry
defaults otherwise: 20 factors, 3,000 steps) is scored by AUPRC of its edge probabilities
and SHD / precision / recall / F1 of its final (thresholded, acyclic) graph; baselines:
chance (AUPRC = edge density; SHD of the empty graph = number of true edges) and
``regression_baseline_scores`` (ridge regression of each gene on the others, ranked;
its binary graph takes the top-k edges with k the true edge count, an oracle k).
Held-out I-NLL: minus the mean over test cells (unseen knockouts) of the log-likelihood
of the non-targeted genes' ``log1p(1e4 x / l)``, for DCD-FG and for independent per-gene
Gaussians fitted on the training cells (no edges).

Speed (``--task speed``): seconds per 100 training steps (batch 256) and the training
process's peak RSS at G = 1,000 and 5,000 genes on CPU (random counts whose labels name
genes; speed does not depend on the values), each size in its own process.

Writes ``<out>/runs/*.json`` (one per fit, skipped when present), ``<out>/speed.json``,
``<out>/accuracy.csv`` and ``<out>/README.md`` (tables). ``--quick``: G = 30, one seed,
500 steps, speed at G = 1,000 only with 5 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _simulate(args, seed: int, mechanism: str):
    from pyro_perturb.data.simulate_dag import causal_dag

    return causal_dag(
        n_genes=args.genes, graph="factor", mechanism=mechanism, n_factors=10, p_gene_to_factor=0.2,
        p_factor_to_gene=0.1, cells_per_intervention=args.cells, n_control_cells=10 * args.cells, seed=seed,
    )


def _y_and_targets(data, split: str):
    import numpy as np
    import torch

    from pyro_perturb.data.targets import target_matrix, targeted_genes
    from pyro_perturb.normalize import log1p_normalize

    idx = data.indices(split)
    batch = data.batch(idx, n_cells=len(idx))
    y = log1p_normalize(batch.x, batch.library)
    targeted = targeted_genes(batch.d, target_matrix(data.spec, "ignore"))
    return y.numpy().astype(np.float64), targeted.numpy(), batch


def _no_edge_inll(data) -> float:
    import numpy as np

    y_train, t_train, _ = _y_and_targets(data, "train")
    y_test, t_test, _ = _y_and_targets(data, "test")
    observed = ~t_train
    mean = (y_train * observed).sum(0) / observed.sum(0)
    var = (((y_train - mean) ** 2) * observed).sum(0) / observed.sum(0)
    lp = -0.5 * (np.log(2 * np.pi * var) + (y_test - mean) ** 2 / var)
    return float(-(lp * ~t_test).sum(1).mean())


def _model_inll(model, data) -> float:
    import torch
    from pyro import poutine

    _, _, batch = _y_and_targets(data, "test")
    model.eval()
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(batch)
        site = trace.nodes["x"]
        return float(-site["fn"].log_prob(site["value"]).mean())


def _graph_scores(truth, scores, binary) -> dict:
    from pyro_perturb.evaluate.graph_metrics import edge_auprc, edge_precision_recall_f1, structural_hamming_distance

    out = {"auprc": edge_auprc(truth, scores), "shd": structural_hamming_distance(truth, binary)}
    out.update(edge_precision_recall_f1(truth, binary))
    return out


def run_accuracy(args) -> list[dict]:
    import numpy as np

    import pyro_perturb as pp
    from pyro_perturb.evaluate.graph_metrics import regression_baseline_scores

    runs = Path(args.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for mechanism in args.mechanisms:
        for seed in args.seeds:
            adata = _simulate(args, seed, mechanism)
            truth = adata.varp["true_adjacency"] != 0
            n_true = int(truth.sum())
            density = n_true / (truth.size - len(truth))
            data = pp.PerturbationData.from_anndata(adata)
            base = {"data": mechanism, "seed": seed, "genes": args.genes, "n_true_edges": n_true, "density": density}
            path = runs / f"baselines_{mechanism}_s{seed}.json"
            if not path.exists():
                y, targeted, _ = _y_and_targets(data, "train")
                scores = regression_baseline_scores(y, targeted)
                top = np.zeros_like(truth)
                off = ~np.eye(len(truth), dtype=bool)
                cut = np.sort(scores[off])[::-1][max(n_true - 1, 0)]
                top = (scores >= cut) & off
                rec = [
                    {**base, "method": "chance", "auprc": density, "shd": n_true, "precision": float("nan"),
                     "recall": 0.0, "f1": 0.0, "n_edges_pred": 0, "i_nll": float("nan")},
                    {**base, "method": "no-edge Gaussians", **_graph_scores(truth, np.zeros_like(scores), np.zeros_like(top)),
                     "i_nll": _no_edge_inll(data)},
                    {**base, "method": "ridge regression (top-k, oracle k)", **_graph_scores(truth, scores, top),
                     "i_nll": float("nan")},
                ]
                path.write_text(json.dumps(rec, indent=1))
            rows += json.loads(path.read_text())
            for conditional in args.conditionals:
                path = runs / f"dcdfg_{conditional}_{mechanism}_s{seed}.json"
                if not path.exists():
                    t0 = time.perf_counter()
                    run = pp.fit(data, model="dcdfg", progress=False, device="cpu", seed=seed, conditional=conditional,
                                 max_steps=args.steps, val_every_steps=max(1, args.steps // 20))
                    seconds = time.perf_counter() - t0
                    model = run.model
                    with __import__("torch").no_grad():
                        h = float(model.constraint())
                    rec = {**base, "method": f"DCD-FG {conditional}",
                           **_graph_scores(truth, model.adjacency().weights, model.dag_adjacency()),
                           "i_nll": _model_inll(model, data), "constraint_h": h, "fit_seconds": seconds,
                           "steps": args.steps}
                    path.write_text(json.dumps(rec, indent=1))
                rows.append(json.loads(path.read_text()))
                print(json.dumps({k: rows[-1][k] for k in ("method", "data", "seed", "auprc", "shd", "f1", "i_nll")}), flush=True)
    return rows


# ---------------------------------------------------------------------------- diagnosis


def _fixed_structure_fit(data, u, v, steps: int, seed: int):
    """DCD-FG with its masks frozen at (u, v) (G x m, m x G 0/1), weights fitted by the
    NLL alone (Adam, lr 1e-2, batch 256)."""
    import numpy as np
    import pyro
    import torch

    from pyro_perturb.infer.engine import make_elbo
    from pyro_perturb.registry import build

    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    model, guide, _ = build("dcdfg", data.spec, {"n_factors": u.shape[1]}, gene_stats=data.gene_stats())
    logits = torch.zeros(model.mask_logits.shape)
    logits[..., 2] = 10.0
    logits[..., 0] += 20.0 * u
    logits[..., 1] += 20.0 * v.T
    model.mask_logits.data.copy_(logits)
    model.mask_logits.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    elbo = make_elbo("trace", 1, 1)
    idx = data.indices("train")
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = data.batch(rng.choice(idx, 256), n_cells=len(idx))
        loss = elbo.differentiable_loss(model, guide, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def run_diagnosis(args) -> dict:
    """Is a weak graph the likelihood's fault or the optimisation's? On one data set: the
    test I-NLL of DCD-FG fitted with the true factor structure frozen, with the reversed
    structure (every edge turned around) frozen, and of the default fit; and the default
    fit's precision against the truth and against the transposed truth."""
    import torch

    import pyro_perturb as pp
    from pyro_perturb.evaluate.graph_metrics import edge_precision_recall_f1

    seed = args.diagnose_seed
    adata = _simulate(args, seed, "linear")
    truth = adata.varp["true_adjacency"] != 0
    data = pp.PerturbationData.from_anndata(adata)
    u = torch.as_tensor(adata.uns["ground_truth"]["factor_inputs"]).float()
    v = torch.as_tensor(adata.uns["ground_truth"]["factor_outputs"]).float()
    out = {"data": "linear", "seed": seed, "genes": args.genes, "no_edge_i_nll": _no_edge_inll(data)}
    out["true_structure_i_nll"] = _model_inll(_fixed_structure_fit(data, u, v, args.steps // 2, seed), data)
    out["reversed_structure_i_nll"] = _model_inll(_fixed_structure_fit(data, v.T, u.T, args.steps // 2, seed), data)
    run = pp.fit(data, model="dcdfg", progress=False, device="cpu", seed=seed, max_steps=args.steps,
                 val_every_steps=max(1, args.steps // 20))
    learned = run.model.dag_adjacency()
    out["learned_i_nll"] = _model_inll(run.model, data)
    out["learned_vs_truth"] = edge_precision_recall_f1(truth, learned)
    out["learned_vs_reversed_truth"] = edge_precision_recall_f1(truth.T, learned)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "diagnosis.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out), flush=True)
    return out


# ---------------------------------------------------------------------------- speed


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def speed_one(n_genes: int, steps: int, conditional: str) -> dict:
    """Seconds per 100 steps and peak RSS of DCD-FG training at ``n_genes`` (this process)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import pyro
    import scipy.sparse as sp
    import torch

    import pyro_perturb as pp
    from pyro_perturb import contract
    from pyro_perturb.infer.engine import make_elbo, training_step
    from pyro_perturb.registry import build

    rng = np.random.default_rng(0)
    genes = [f"g{i:05d}" for i in range(n_genes)]
    n_ko = min(n_genes, 500)
    labels = np.r_[np.full(512, "control"), np.repeat(np.asarray(genes[:n_ko]), 2)]
    x = sp.csr_matrix(rng.poisson(2.0, (len(labels), n_genes)).astype(np.float32))
    adata = ad.AnnData(X=x, obs=pd.DataFrame({"perturbation": pd.Categorical(labels)}),
                       var=pd.DataFrame(index=genes))
    data = pp.PerturbationData.from_anndata(adata)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    model, guide, _ = build("dcdfg", data.spec, {"conditional": conditional}, gene_stats=data.gene_stats())
    elbo = make_elbo("trace", 1, 1)
    optimizer = torch.optim.Adam(list(model.parameters()), lr=1e-2)
    aux = contract.auxiliary_loss(model)
    idx = data.indices("train")
    batches = [data.batch(idx[i * 256 : (i + 1) * 256], n_cells=len(idx)) for i in range(max(1, min(4, len(idx) // 256)))]
    rss_before = _rss_mib()
    model.train()
    for b in batches[:2]:  # warm-up
        training_step(model, guide, b, elbo, optimizer, 10.0, aux, validate_distributions=False)
    t0 = time.perf_counter()
    for i in range(steps):
        training_step(model, guide, batches[i % len(batches)], elbo, optimizer, 10.0, aux, validate_distributions=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"genes": n_genes, "conditional": conditional, "steps_timed": steps, "batch": 256,
            "seconds_per_100_steps": 100 * seconds / steps, "peak_rss_mib": peak, "rss_before_training_mib": rss_before,
            "parameters": sum(p.numel() for p in model.parameters())}


def run_speed(args) -> list[dict]:
    out = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for conditional in args.conditionals:
        for g in args.speed_genes:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--speed-one", str(g), "--speed-steps",
                   str(args.speed_steps), "--conditionals", conditional]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(out[-1]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "speed.json").write_text(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------- report


def _fmt(v, digits=3):
    import math

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


NOTES = [
    "## Reading", "",
    "* Linear data: DCD-FG with linear conditionals beats the ridge-regression ranking on every edge "
    "metric (AUPRC 0.42 vs 0.30, F1 0.53 vs 0.32, SHD 222 vs 340; ridge is even given the true edge "
    "count) and fits held-out knockouts better than independent genes (I-NLL 76.4 vs 86.3 nats per "
    "cell). The MLP conditionals are worse and unstable on the same data (F1 0.25 +- 0.21).",
    "* MLP (nonlinear) data: both variants **lose**: edge recovery at chance (AUPRC 0.02 vs 0.25 for "
    "ridge), although the I-NLL is below independent genes' on average (84 linear / 123 MLP vs 185; the "
    "MLP conditionals' seed 2, which did not reach acyclicity (h 0.96), is worse: 192).",
    "* Training schedule matters: the first defaults (3,000 steps, `constraint_every=50`; "
    "`first_defaults/README.md`) gave AUPRC 0.10 / F1 0.16 on linear data, below ridge, with graphs "
    "often globally reversed although the true structure has the better likelihood (diagnosis in that "
    "file: test I-NLL 73.0 with the true structure frozen, 76.5 reversed, 77.1 learned). Updating the "
    "augmented Lagrangian every 200 steps over 6,000 steps (the current defaults) fixed it on all 3 "
    "seeds. Other settings tried on one seed at 3,000 steps (`constraint_growth=2`, `sparsity=0.01`, "
    "`n_factors=10`, `mask_init` 0.05 / 0.15) did not.",
    "* The paper's setting is 100 variables, 10 modules, 50,000 samples over 100 intervention regimes "
    "(1-3 targets each; here one knockout per gene, 50 cells each, 5,500 cells), fitted with 20 modules "
    "by RMSprop to convergence then fine-tuned. The paper's table values could not be read from the "
    "references available offline in this session, so none is quoted beside ours.",
    "* Speed (measured with the first defaults; the schedule does not change a step's cost): one "
    "training step is linear in G (O(G m) masks and products; the acyclicity constraint is a power "
    "iteration on the m x m factor graph); memory above the data stays under 150 MiB at 5,000 genes.",
    "",
]


def write_report(args, rows: list[dict], speed: list[dict]) -> None:
    import numpy as np
    import pandas as pd

    out = Path(args.out)
    lines = [
        "# DCD-FG on the causal-DAG simulator", "",
        f"Command: `python bench/graph_dcdfg.py {' '.join(sys.argv[1:])}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared with other jobs, torch CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}.",
        "",
    ]
    if rows:
        df = pd.DataFrame(rows)
        df.to_csv(out / "accuracy.csv", index=False)
        lines += [
            f"## Edge recovery and held-out I-NLL (G = {args.genes}, 10 true factors, seeds {', '.join(map(str, args.seeds))})",
            "",
            "Mean (sd) over seeds. AUPRC of edge scores (chance = edge density); SHD, precision, recall, F1 of the "
            "binary graph (DCD-FG: its final acyclic graph; regression: top-k with k the true edge count). I-NLL: "
            "nats per test cell (unseen knockouts), non-targeted genes, on log1p(1e4 x / l); lower is better.",
            "",
            "| data | method | AUPRC | SHD | precision | recall | F1 | edges called | I-NLL | final h |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (data_kind, method), g in df.groupby(["data", "method"], sort=False):
            def ms(col, d=3):
                if col not in g or g[col].isna().all():
                    return "-"
                v = g[col].astype(float)
                return f"{v.mean():.{d}f}" + (f" ({v.std(ddof=1):.{d}f})" if len(v) > 1 else "")
            lines.append(f"| {data_kind} | {method} | {ms('auprc')} | {ms('shd', 1)} | {ms('precision')} | {ms('recall')} | "
                         f"{ms('f1')} | {ms('n_edges_pred', 1)} | {ms('i_nll', 2)} | {ms('constraint_h', 4)} |")
        lines += ["", f"True edges per data set: {', '.join(str(int(v)) for v in df.groupby(['data', 'seed'])['n_true_edges'].first())}.", ""]
    if speed:
        lines += ["## Training speed (CPU)", "",
                  "| conditional | genes | s / 100 steps | peak RSS MiB | RSS before training MiB | parameters |",
                  "|---|---|---|---|---|---|"]
        for s in speed:
            lines.append(f"| {s['conditional']} | {s['genes']} | {s['seconds_per_100_steps']:.2f} | {s['peak_rss_mib']:.0f} | "
                         f"{s['rss_before_training_mib']:.0f} | {s['parameters']} |")
        by = {}
        for s in speed:
            by.setdefault(s["conditional"], {})[s["genes"]] = s["seconds_per_100_steps"]
        for cond, d in by.items():
            if len(d) >= 2:
                (g0, t0), (g1, t1) = sorted(d.items())[0], sorted(d.items())[-1]
                lines.append(f"\n{cond}: time grows {t1 / t0:.2f}x from {g0} to {g1} genes ({g1 / g0:.0f}x genes).")
        lines.append("")
    diagnosis_path = out / "diagnosis.json"
    if diagnosis_path.exists():
        d = json.loads(diagnosis_path.read_text())
        lines += [
            f"## Diagnosis: likelihood or optimisation? (linear data, seed {d['seed']}, `--task diagnose`)", "",
            "Test I-NLL (nats per cell) of DCD-FG with its factor masks frozen at the true structure, at the "
            "reversed structure (every edge turned around), and of the default fit:", "",
            "| no edges | true structure | reversed structure | default fit |", "|---|---|---|---|",
            f"| {d['no_edge_i_nll']:.2f} | {d['true_structure_i_nll']:.2f} | {d['reversed_structure_i_nll']:.2f} | "
            f"{d['learned_i_nll']:.2f} |", "",
            f"The default fit's graph: precision {d['learned_vs_truth']['precision']:.2f} against the truth, "
            f"{d['learned_vs_reversed_truth']['precision']:.2f} against the transposed truth "
            f"({d['learned_vs_truth']['n_edges_pred']} edges called).", "",
        ]
    lines += NOTES
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(args) -> int:
    if args.speed_one:
        print(json.dumps(speed_one(args.speed_one, args.speed_steps, args.conditionals[0])))
        return 0
    if args.quick:
        args.genes, args.seeds, args.steps, args.cells = 30, [0], 500, 20
        args.speed_genes, args.speed_steps = [1000], 5
    if args.task == "diagnose":
        run_diagnosis(args)
    rows = run_accuracy(args) if args.task in ("accuracy", "all") else []
    speed_path = Path(args.out) / "speed.json"
    speed = run_speed(args) if args.task in ("speed", "all") else (json.loads(speed_path.read_text()) if speed_path.exists() else [])
    if not rows:
        runs = Path(args.out) / "runs"
        for p in sorted(runs.glob("*.json")) if runs.exists() else []:
            rec = json.loads(p.read_text())
            rows += rec if isinstance(rec, list) else [rec]
    write_report(args, rows, speed)
    print(f"wrote {Path(args.out) / 'README.md'}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("accuracy", "speed", "diagnose", "report", "all"), default="all")
    p.add_argument("--diagnose-seed", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "graph_dcdfg"))
    p.add_argument("--genes", type=int, default=100)
    p.add_argument("--cells", type=int, default=50, help="cells per knockout (controls: 10x)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--mechanisms", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    p.add_argument("--conditionals", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    p.add_argument("--speed-genes", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--speed-steps", type=int, default=10)
    p.add_argument("--speed-one", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="G=30, one seed, 500 steps; speed at 1,000 genes, 5 steps")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
