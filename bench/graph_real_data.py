"""Gene-graph models on Papalexi 2021 (ECCITE-seq knockouts in IFN-gamma-stimulated THP-1
cells): held-out interventional NLL beside the no-edge baseline, and the IFN-gamma pathway
edges the graphs learn.

Data: ``../shared/data/papalexi2021_eccite_lowmoi.h5ad`` (20,729 cells x 299 genes, 25
knockouts). Only 9 knockouts target a measured gene (CMTM6, IFNGR2, JAK2, NFKBIA, STAT1,
STAT2, STAT3, TNFRSF14, UBE2L6); the other 16 (IFNGR1, IRF1, ...) name no measured gene and
are kept as observational cells (``unmatched_targets=ignore``, the design of the family), or
dropped with ``--unmatched drop``. Genes: the ``--genes`` most variable of ``y = log1p(1e4 x
/ l)`` plus the 9 targeted genes (``--genes 0``: all 299); the library ``l`` is then the
total over the kept genes (the data contract).

Held-out interventions: three folds of the 9 measured-gene knockouts (:data:`FOLDS`); a fold's
knockouts form the test split (``fit(..., heldout_perturbations=...)``), every other cell is
train/val. Per (model, fold, seed): the test I-NLL per cell (``-IWELBO``, nats summed over
the non-targeted genes) beside the no-edge baseline on the same cells (independent
Gaussians per gene fitted on the training cells, :func:`pyro_perturb.evaluate.graph.no_edge_baseline`),
per held-out label, and the learned edges out of IFNGR2, JAK2 and STAT1 (IFNGR1 and IRF1 are
not measured) with, as a data-level reference, the genes whose mean ``y`` moves most in that
knockout (Welch t against the control cells).

    python bench/graph_real_data.py --models dcdfg nodags --seeds 0 --genes 100
    python bench/graph_real_data.py --quick            # a minute: 2,000 cells, 20 genes, 1 fold
    python bench/graph_real_data.py --table-only       # rebuild summary.md from runs/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_FILE = "papalexi2021_eccite_lowmoi.h5ad"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "graph_real_data"
#: the 9 knockouts whose target is measured, in three folds of held-out interventions
FOLDS = (("IFNGR2", "STAT2", "TNFRSF14"), ("JAK2", "STAT3", "UBE2L6"), ("STAT1", "CMTM6", "NFKBIA"))
#: the measured genes of the IFN-gamma -> JAK -> STAT1 axis (IFNGR1, JAK1, IRF1 are not measured)
PATHWAY_SOURCES = ("IFNGR2", "JAK2", "STAT1")
#: measured interferon-stimulated genes (induced through STAT1 / IRF1): the panel has none of
#: GBP1-5, IDO1, CXCL10, CD274 (PD-L1), IRF1
KNOWN_TARGETS = ("STAT1", "STAT2", "UBE2L6", "PSMB9", "APOBEC3G")


def load(path: Path, n_genes: int, unmatched: str, max_cells: int | None, seed: int):
    """The Papalexi AnnData restricted to the chosen genes (and cells)."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    targeted = [g for fold in FOLDS for g in fold]
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    if unmatched == "drop":
        adata = adata[np.isin(labels, ["control", *targeted])].copy()
    if max_cells is not None and adata.n_obs > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
        adata = adata[keep].copy()
    if n_genes:
        x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        y = np.log1p(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1))
        order = np.argsort(-y.var(0), kind="stable")
        chosen = set(np.asarray(adata.var_names)[order[:n_genes]]) | set(targeted)
        adata = adata[:, [g for g in adata.var_names if g in chosen]].copy()
        totals = np.asarray(adata.X.sum(1)).ravel()
        adata = adata[totals > 0].copy()  # a cell needs counts over the kept genes (its library)
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str)
    return adata


def data_response(adata, sources=FOLDS[0] + FOLDS[1] + FOLDS[2], top: int = 10) -> dict:
    """Per knockout: the genes whose mean ``y`` differs most from the control's (Welch t),
    and, as ``"<gene> (own)"``, its own gene's (with the ratio of mean normalised
    expression, ``1e4 x / l``, knockout over control)."""
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    y = np.log1p(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1))
    labels = adata.obs["perturbation"].to_numpy()
    genes = np.asarray(adata.var_names)
    ctrl = y[labels == "control"]
    out = {}
    for source in sources:
        ko = y[labels == source]
        if not len(ko):
            continue
        diff = ko.mean(0) - ctrl.mean(0)
        t = diff / np.sqrt(ko.var(0, ddof=1) / len(ko) + ctrl.var(0, ddof=1) / len(ctrl) + 1e-12)
        own = genes == source
        self_effect = {"gene": source, "t": float(t[own][0]), "diff": float(diff[own][0]),
                       "normalized_ratio": float(np.expm1(ko[:, own]).mean() / np.expm1(ctrl[:, own]).mean())}
        t[own] = 0.0  # its own knockout, reported apart
        order = np.argsort(-np.abs(t))[:top]
        out[source] = [{"gene": str(genes[i]), "t": float(t[i]), "diff": float(diff[i])} for i in order]
        out[source + " (own)"] = [self_effect]
    return out


def pathway_edges(run, sources=PATHWAY_SOURCES, top: int = 10) -> dict:
    """Per source gene: its ``top`` strongest outgoing edges and the weight and rank of the
    edges to :data:`KNOWN_TARGETS` (rank among its outgoing edges by ``|weight|``)."""
    frame = run.adjacency()
    out = {}
    for source in sources:
        if source not in frame.index:
            continue
        row = frame.loc[source].drop(source)
        ranked = row.abs().sort_values(ascending=False, kind="stable")
        rank = {g: i + 1 for i, g in enumerate(ranked.index)}
        out[source] = {
            "top": [{"target": g, "weight": float(row[g])} for g in ranked.index[:top]],
            "known": {g: {"weight": float(row[g]), "rank": rank[g]} for g in KNOWN_TARGETS if g in row.index},
            "n_targets": int(len(row)),
            "in_edges_top": [{"source": g, "weight": float(frame.loc[g, source])}
                             for g in frame[source].drop(source).abs().sort_values(ascending=False).index[:5]],
        }
    return out


def one_run(adata, model: str, fold: int, seed: int, args) -> dict:
    from pyro_perturb.evaluate.graph import inll_per_label, no_edge_baseline
    from pyro_perturb.run import fit

    settings = dict(seed=seed, progress=False, heldout_perturbations=list(FOLDS[fold]))
    if args.max_epochs is not None:
        settings["max_epochs"] = args.max_epochs
    if args.max_steps is not None:
        settings["max_steps"] = args.max_steps
    from pyro_perturb.registry import get_entry

    if "unmatched_targets" in get_entry(model).hyperparameters():
        settings["unmatched_targets"] = "ignore"
    from pyro_perturb.cli import _parse_value

    for item in args.set or []:
        key, value = item.split("=", 1)
        prefix, _, key = key.rpartition(".")
        if prefix in ("", model):  # "nodags.lr=1e-2" applies to that model only
            settings[key] = _parse_value(value)
    start = time.time()
    run = fit(adata, model=model, **settings)
    fit_s = time.time() - start
    data = run.data
    idx = data.indices("test")
    model_nll = -run.iwelbo(data, split="test", num_particles=args.particles, seed=seed)
    baseline = no_edge_baseline(data, idx)
    table = inll_per_label(data, idx, model_nll, baseline)
    val_idx = data.indices("val")
    val_model = -run.iwelbo(data, split="val", num_particles=args.particles, seed=seed)
    val_base = no_edge_baseline(data, val_idx)
    last = run.history[-1] if run.history else {}
    return {
        "model": model, "fold": fold, "seed": seed, "heldout": list(FOLDS[fold]),
        "n_genes": data.spec.n_genes, "n_cells": data.n_cells, "n_test_cells": int(len(idx)),
        "fit_s": fit_s, "steps": last.get("step"), "epochs": last.get("epoch"),
        "test_inll_model": float(model_nll.mean()), "test_inll_no_edge": float(baseline.mean()),
        "test_delta_se": float(np.std(model_nll - baseline, ddof=1) / np.sqrt(len(idx))),
        "val_inll_model": float(val_model.mean()), "val_inll_no_edge": float(val_base.mean()),
        "per_label": table.to_dict("records"),
        "pathway": pathway_edges(run),
        "n_edges_nonzero": int((np.abs(run.adjacency().to_numpy()) > 0).sum()),
        # the edges Run.edges() calls (probability > 0.5; every non-zero magnitude), and the
        # strongest 1% for comparison across models of different weight scales
        "n_edges_called": int(len(run.edges())),
        "n_genes_with_out_edges": int(run.edges()["source"].nunique()),
        "hparams": run.hparams,
    }


#: the edges of the pathway table: the pathway genes and the interferon-stimulated ones
_PATHWAY_TARGETS = ("IFNGR2", "JAK2", "STAT1", "STAT2", "STAT3", "UBE2L6", "TNFRSF14", "PSMB9", "APOBEC3G")


def _targets_of(block: dict) -> dict:
    """``{target: weight}`` of a run's edges out of one source, for :data:`_PATHWAY_TARGETS`."""
    values = {e["target"]: e["weight"] for e in block["top"]}
    values.update({g: v["weight"] for g, v in block["known"].items()})
    return {g: w for g, w in values.items() if g in _PATHWAY_TARGETS}


def summarize(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not runs:
        return "no runs\n"
    for r in runs:  # a variant (--tag) is shown as its own model
        r["model"] = r["model"] + r.get("tag", "")
    lines = ["## Held-out interventions: test I-NLL per cell (nats, lower is better)", "",
             "| model | fold (held out) | seed | genes | test cells | model I-NLL | no-edge I-NLL | model - no-edge (SE) "
             "| val: model - no-edge | fit s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(
            f"| {r['model']} | {r['fold']} ({', '.join(r['heldout'])}) | {r['seed']} | {r['n_genes']} | {r['n_test_cells']} "
            f"| {r['test_inll_model']:.2f} | {r['test_inll_no_edge']:.2f} "
            f"| {r['test_inll_model'] - r['test_inll_no_edge']:+.2f} ({r['test_delta_se']:.2f}) "
            f"| {r['val_inll_model'] - r['val_inll_no_edge']:+.2f} | {r['fit_s']:.0f} |")
    lines += ["", "## Mean over folds and seeds", "",
              "| model | runs | test I-NLL | no-edge | model - no-edge (range over runs) | val: model - no-edge |",
              "|---|---|---|---|---|---|"]
    by_model: dict = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in sorted(by_model.items()):
        deltas = [r["test_inll_model"] - r["test_inll_no_edge"] for r in rs]
        lines.append(
            f"| {model} | {len(rs)} | {np.mean([r['test_inll_model'] for r in rs]):.2f} "
            f"| {np.mean([r['test_inll_no_edge'] for r in rs]):.2f} | {np.mean(deltas):+.2f} ({min(deltas):+.2f} to {max(deltas):+.2f}) "
            f"| {np.mean([r['val_inll_model'] - r['val_inll_no_edge'] for r in rs]):+.2f} |")
    lines += ["", "## Pathway edges over runs (where the source's knockout was trained on; an edge is listed in a run when among the source's top 10 or a known target: min to max weight, runs listed)", "",
              "| model | edge | weights | runs |", "|---|---|---|---|"]
    edges: dict = {}
    for r in runs:
        for source, block in r["pathway"].items():
            if source in r["heldout"]:
                continue
            for target, value in _targets_of(block).items():
                edges.setdefault((r["model"], source, target), []).append(value)
    for (model, source, target), values in sorted(edges.items()):
        lines.append(f"| {model} | {source} -> {target} | {min(values):+.3f} to {max(values):+.3f} | {len(values)} |")
    lines += ["", "## Per held-out knockout (mean over seeds)", "",
              "| model | knockout | cells | model I-NLL | no-edge I-NLL | model - no-edge |", "|---|---|---|---|---|---|"]
    per: dict = {}
    for r in runs:
        for row in r["per_label"]:
            per.setdefault((r["model"], row["perturbation"]), []).append(row)
    for (model, label), rows in sorted(per.items()):
        m = np.mean([x["inll_model"] for x in rows])
        b = np.mean([x["inll_no_edge"] for x in rows])
        lines.append(f"| {model} | {label} | {rows[0]['n_cells']} | {m:.2f} | {b:.2f} | {m - b:+.2f} |")
    lines += ["", "## IFN-gamma pathway: learned outgoing edges (runs where the source's knockout was trained on)", ""]
    for r in runs:
        for source, block in r["pathway"].items():
            if source in r["heldout"]:
                continue
            shown = [e for e in block["top"][:6] if abs(e["weight"]) >= 5e-3]
            top = ", ".join(f"{e['target']} {e['weight']:+.3f}" for e in shown) or "no edge (all |weight| < 0.005)"
            known = ", ".join(f"{g} #{v['rank']} ({v['weight']:+.3f})" for g, v in block["known"].items())
            into = ", ".join(f"{e['source']} {e['weight']:+.3f}" for e in block.get("in_edges_top", [])[:3]
                             if abs(e["weight"]) >= 5e-3) or "none"
            lines.append(f"- {r['model']} fold {r['fold']} seed {r['seed']}: **{source}** -> {top}; "
                         f"known targets' rank of {block['n_targets']}: {known}; strongest edges into {source}: {into}")
    response = out / "data_response.json"
    if response.exists():
        lines += ["", "## Data reference: genes moved most by each knockout (Welch t vs control, all cells)", ""]
        for source, rows in json.loads(response.read_text()).items():
            if source.endswith(" (own)"):
                lines.append(f"  - its own mRNA in its knockout: t={rows[0]['t']:+.1f}, normalised expression "
                             f"{rows[0]['normalized_ratio']:.2f}x the control's")
                continue
            lines.append(f"- **{source}**: " + ", ".join(f"{x['gene']} t={x['t']:+.1f}" for x in rows[:8]))
    return "\n".join(lines) + "\n"


def main(args) -> None:
    out = Path(args.out)
    if args.table_only:
        text = summarize(out)
        (out / "summary.md").write_text(text)
        print(text)
        return
    path = Path(args.data)
    if not path.exists():
        raise SystemExit(f"{path} is missing (pass --data PATH to the Papalexi 2021 file)")
    if args.quick:
        args.genes, args.max_cells, args.folds, args.seeds = 20, 2000, [0], [0]
        args.max_epochs = args.max_epochs or 2
    from pyro_perturb.registry import list_models

    registered = {e.name for e in list_models()}
    models = [m for m in args.models if m in registered]
    for m in set(args.models) - set(models):
        print(f"model {m!r} is not registered in this checkout: skipped")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    adata = load(path, args.genes, args.unmatched, args.max_cells, seed=0)
    print(f"data: {adata.n_obs} cells x {adata.n_vars} genes")
    (out / "data_response.json").write_text(json.dumps(data_response(adata), indent=1))
    for model in models:
        for fold in args.folds:
            for seed in args.seeds:
                path = out / "runs" / f"{model}_fold{fold}_seed{seed}{args.tag}.json"
                if path.exists() and not args.overwrite:
                    print(f"{path.name}: done")
                    continue
                result = one_run(adata, model, fold, seed, args)
                result["settings"] = {"genes": args.genes, "unmatched": args.unmatched, "max_cells": args.max_cells,
                                      "particles": args.particles, "set": list(args.set or [])}
                result["tag"] = args.tag
                path.write_text(json.dumps(result, indent=1, default=float))
                print(f"{path.name}: test I-NLL {result['test_inll_model']:.2f} vs no-edge "
                      f"{result['test_inll_no_edge']:.2f} ({result['fit_s']:.0f} s)")
    text = summarize(out)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dcdfg", "nodags"])
    parser.add_argument("--data", default=str(SHARED / DATA_FILE), help="the Papalexi 2021 .h5ad")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2], choices=[0, 1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--genes", type=int, default=100, help="most variable genes kept besides the 9 targeted (0: all)")
    parser.add_argument("--unmatched", choices=["ignore", "drop"], default="ignore",
                        help="cells of the 16 knockouts of unmeasured genes: observational (ignore) or dropped")
    parser.add_argument("--max-cells", type=int, help="subsample cells (seeded)")
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--particles", type=int, default=10, help="IWELBO particles")
    parser.add_argument("--set", action="append", metavar="[MODEL.]KEY=VALUE", help="model or training setting")
    parser.add_argument("--tag", default="", help="suffix of the run files (variants)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny settings (2,000 cells, 20 genes, fold 0, 2 epochs)")
    parser.add_argument("--table-only", action="store_true", help="rebuild summary.md from runs/")
    args = parser.parse_args()
    main(args)
