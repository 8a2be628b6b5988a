"""The ``pyro-perturb`` command.

Subcommands: ``models``, ``simulate``, ``fit``, ``evaluate``, ``predict``, ``transfer``, ``demo``,
``graph`` (the learned gene graph of a gene-graph model, as an edge list).
Bad input (a missing column, an unknown perturbation, a non-count matrix, a bad
setting) ends with a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

SIMULATORS = {"sparse-shift": "sparse_shift", "combinatorial": "combinatorial", "factorized": "factorized",
              "comparative": "comparative", "causal-dag": "causal_dag", "cyclic-graph": "cyclic_graph"}


class UsageError(ValueError):
    pass


def _parse_value(text: str):
    """``--set`` values: Python literals (numbers, bools, None, lists, dicts) or strings."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_sets(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out


def cmd_models(args) -> int:
    from .registry import list_models

    for entry in list_models():
        print(f"{entry.name:<14} {entry.description}")
    return 0


def cmd_simulate(args) -> int:
    from .data import simulate

    sizes = _parse_sets(args.set)
    fn = getattr(simulate, SIMULATORS[args.kind])
    try:
        adata = fn(seed=args.seed, **sizes)
    except TypeError as e:
        raise UsageError(f"bad size option for {args.kind}: {e}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes")
    return 0


def cmd_fit(args) -> int:
    from .run import fit

    settings = _parse_sets(args.set)
    for key in ("perturbation_key", "control", "layer", "split_key", "max_epochs", "max_steps", "batch_size", "lr", "seed", "device"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if args.n_latent is not None:
        settings["n_latent"] = args.n_latent
    if args.covariate_keys is not None:
        settings["covariate_keys"] = [k for k in args.covariate_keys.split(",") if k]
    if args.heldout_perturbations is not None:
        heldout = [lab.strip() for lab in args.heldout_perturbations.split(",") if lab.strip()]
        if not heldout:
            raise UsageError("--heldout-perturbations expects comma-separated labels, e.g. 'A,B'")
        settings["heldout_perturbations"] = heldout
    settings.setdefault("progress", sys.stderr.isatty() and not args.quiet)
    if args.backed and not args.data:
        raise UsageError("--backed needs --data FILE.h5ad")
    from .infer import distributed

    try:
        run = fit(args.data, model=args.model, out=args.out, resume=args.resume, backed=args.backed or None, **settings)
    finally:
        distributed.shutdown()  # under torchrun; a no-op in one process
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, only rank 0 reports
    last = run.history[-1] if run.history else {}
    print(
        f"trained {args.model} for {last.get('step', 0)} optimizer steps (epoch {last.get('epoch', 0)}); final train loss "
        f"{last.get('train_loss', float('nan')):.4f}, validation loss {last.get('val_loss', float('nan')):.4f} "
        f"(per cell); run saved to {args.out}"
    )
    return 0


def _data_for(run, path):
    """``--data`` when given, else the run's own training data (:meth:`Run.load_data`)."""
    if path is not None:
        return path
    if not run.data_source:
        raise UsageError("the run was trained on in-memory data; pass --data FILE.h5ad")
    return run.load_data()


def cmd_evaluate(args) -> int:
    from .evaluate import write_metrics
    from .run import load_run

    run = load_run(args.run_dir, device=args.device)
    out = Path(args.out)
    results = run.evaluate(
        _data_for(run, args.data), num_particles=args.num_particles, out_dir=out.parent, seed=args.seed,
        ate_particles=args.ate_particles, ate_plots=not args.no_plots, ate_ppc=not args.no_plots,
        ate_memory_mb=args.ate_memory_mb, ate_library=_parse_library(args.ate_library, "--ate-library"),
        ate_basal=args.ate_basal,
    )
    write_metrics(results, out)
    summary = {s: results[s].get("iwelbo") for s in ("train", "val", "test") if s in results}
    print(f"wrote {out}; iwelbo per split: {json.dumps(summary)}")
    if results.get("comparison"):
        from .evaluate.comparison import comparison_table

        print(comparison_table(results["comparison"]))
    return 0


def _parse_library(text: str, flag: str = "--library"):
    """``--library`` / ``--ate-library``: ``observed`` or a positive number."""
    if text.strip().lower() == "observed":
        return "observed"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{flag} expects 'observed' or a positive number, got {text!r}")
    return value


def cmd_predict(args) -> int:
    from .run import load_run

    run = load_run(args.run_dir, device=args.device)
    out = Path(args.out)
    if args.perturbations is not None:
        labels = [lab.strip() for lab in args.perturbations.split(",") if lab.strip()]
        if not labels:
            raise UsageError("--perturbations expects comma-separated labels, e.g. 'A+B,C'")
        if args.n_cells < 1:
            raise UsageError(f"--n-cells must be >= 1, got {args.n_cells}")
        adata = run.sample(labels, n_cells=args.n_cells, library=_parse_library(args.library), seed=args.seed,
                           covariates=args.covariates, data=args.data, sparse=not args.dense)
        out.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(out)
        print(f"wrote {out}: {adata.n_obs} predicted cells ({args.n_cells} per label, {len(adata.obs[run.spec.perturbation_key].cat.categories)} "
              f"labels) x {adata.n_vars} genes, library {adata.uns['pyro_perturb']['library']}")
        return 0
    if args.data is None:
        raise UsageError("predict needs --data FILE.h5ad (latents of its cells) or --perturbations LABELS (predicted cells)")
    adata = run.predict(args.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    print(f"wrote {out} with obsm keys {sorted(adata.obsm.keys())}")
    return 0


def cmd_transfer(args) -> int:
    from .evaluate import write_metrics
    from .infer.transfer import transfer_run
    from .run import load_run

    run = load_run(args.run_dir, device=args.device)
    results = transfer_run(
        run,
        _data_for(run, args.data),
        split=args.split,
        fit_fraction=args.fit_fraction,
        fit_cells_per_label=args.fit_cells_per_label,
        max_epochs=args.max_epochs,
        min_steps=args.min_steps,
        lr=args.lr,
        num_particles=args.num_particles,
        seed=args.seed,
    )
    out = Path(args.out)
    write_metrics(results, out)
    print(
        f"wrote {out}; held-out ELBO {results['transfer_elbo']:.3f}, IWELBO {results['transfer_iwelbo']:.3f} "
        f"per cell ({results['n_eval_cells']} cells, {results['n_parameters_fitted']} parameters fitted)"
    )
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def cmd_graph(args) -> int:
    from .run import load_run

    run = load_run(args.run_dir, device="cpu")
    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be >= 1, got {args.top}")
    edges = run.edges(threshold=args.threshold, top=args.top)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    edges.to_csv(out, index=False)
    message = f"wrote {out}: {len(edges)} edges"
    if args.matrix is not None:
        matrix = Path(args.matrix)
        matrix.parent.mkdir(parents=True, exist_ok=True)
        frame = run.adjacency(threshold=args.threshold)
        frame.to_csv(matrix)
        message += f"; {matrix}: {frame.shape[0]} x {frame.shape[1]} adjacency (rows: source genes)"
    print(message)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-perturb", description="Pyro model zoo for single-cell perturbation data")
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"pyro-perturb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("simulate", help="write a simulated dataset with ground truth")
    p.add_argument("kind", choices=sorted(SIMULATORS))
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="simulator option, e.g. n_genes=50 or depth=shallow (repeatable)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("fit", help="train a model and write a run directory")
    p.add_argument("--model", required=True)
    p.add_argument("--data", help=".h5ad with raw counts (default: built-in simulated data)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--perturbation-key")
    p.add_argument("--control")
    p.add_argument("--covariate-keys", help="comma-separated obs columns")
    p.add_argument("--layer")
    p.add_argument("--split-key")
    p.add_argument("--max-epochs", type=int, help="epoch budget; given without --max-steps, the whole budget "
                   "(the model's default step budget is then not used)")
    p.add_argument("--max-steps", type=int, help="optimizer-step budget, the same whatever the data's size; training "
                   "stops there, mid-epoch included (with --resume: raise it to continue)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--n-latent", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument(
        "--backed", action="store_true",
        help="read --data from disk minibatch by minibatch, never loading the counts whole (out-of-core); "
        "add --set shuffle_block_size=64 for faster reads",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--heldout-perturbations", metavar="LABELS",
                   help="comma-separated labels whose cells all form the test split (held-out interventions; "
                   "the data must have no split column)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model or training setting (repeatable)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="held-out IWELBO and the model's metrics, as metrics.json")
    p.add_argument("run_dir")
    p.add_argument("--data")
    p.add_argument("--out", required=True, help="metrics.json path; other outputs go beside it")
    p.add_argument("--num-particles", type=int, default=100, help="IWELBO importance samples")
    p.add_argument("--ate-particles", type=int, default=None,
                   help="posterior predictive particles of the model effects (default 250: with the count noise "
                   "integrated out, ~10x more precise than the SAMS-VAE paper's 2,500 sampled ones)")
    p.add_argument("--ate-memory-mb", type=float, help="working-memory budget (MB) of the model ATE: it uses the "
                   "largest treatment batch that fits (default 1024)")
    p.add_argument("--ate-library", default="observed",
                   help="library size of the model's drawn cells: 'observed' (each row at the depths of the held-out "
                   "cells it is compared with; default) or a number, e.g. 1e4 (the SAMS-VAE paper's)")
    p.add_argument("--ate-basal", choices=["prior", "controls"], default="prior",
                   help="basal states of the model's drawn cells: 'prior' (the paper's; default) or 'controls' "
                   "(posterior draws of training control cells, decoded under each dosage; models with basal sites)")
    p.add_argument("--no-plots", action="store_true", help="skip the PPC export and PNG plots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="posterior-mean latents into obsm of a copy of the data, or, with --perturbations, "
        "predicted cells (counts) of given perturbations as an .h5ad",
    )
    p.add_argument("run_dir")
    p.add_argument("--data", help=".h5ad whose cells get latents (without --perturbations); with --perturbations, "
                   "only read for the training depths of a run saved before they were stored")
    p.add_argument("--out", required=True)
    p.add_argument("--perturbations", metavar="LABELS",
                   help="comma-separated labels, e.g. 'A+B,C': write N_CELLS predicted cells (counts) of each")
    p.add_argument("--n-cells", type=int, default=100, help="predicted cells per label (default 100)")
    p.add_argument("--library", default="observed", metavar="observed|NUMBER",
                   help="library size of the predicted cells: 'observed' (default: drawn from the training cells "
                   "of each label) or a number (e.g. 10000)")
    p.add_argument("--covariates", metavar="VALUES",
                   help="covariate values of the predicted cells, joined with '|' in the run's covariate order "
                   "(default: the first category of each)")
    p.add_argument("--dense", action="store_true", help="dense X (default: CSR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "transfer",
        help="OOD transfer: freeze a run, fit only the held-out perturbations' parameters, "
        "report held-out ELBO and IWELBO as metrics.json",
    )
    p.add_argument("run_dir")
    p.add_argument("--data", help=".h5ad (default: the run's training data)")
    p.add_argument("--out", required=True, help="metrics.json path")
    p.add_argument("--split", default="test", help="split holding the held-out perturbations' cells")
    p.add_argument("--fit-fraction", type=float, default=0.5, help="share of held-out cells used to fit")
    p.add_argument("--fit-cells-per-label", type=int, help="cap on fit cells per held-out label (few-shot)")
    p.add_argument("--max-epochs", type=int, default=50)
    p.add_argument("--min-steps", type=int, default=500, help="at least this many optimizer steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--num-particles", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("graph", help="the learned gene graph of a gene-graph model (dcdfg, nodags) as an edge list CSV")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="edge list CSV: source, target, weight (strongest first)")
    p.add_argument("--threshold", type=float,
                   help="keep edges with |weight| above it (default: 0.5 for edge probabilities, 0 for magnitudes)")
    p.add_argument("--top", type=int, help="keep the N strongest edges")
    p.add_argument("--matrix", metavar="CSV", help="also write the genes x genes adjacency (rows: source genes; "
                   "entries at or below --threshold set to 0)")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("demo", help="the main job on built-in data: simulate, fit, evaluate, plot")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; for smoke tests)")
    p.set_defaults(func=cmd_demo)
    add_de_parser(sub)
    return parser


def cmd_de(args) -> int:
    from .evaluate.de import differential_expression
    from .run import load_run

    run = load_run(args.run_dir, device=args.device)
    frame = differential_expression(
        run, args.data, args.perturbation, control=args.control, delta=args.delta, fdr=args.fdr,
        method=args.method, n_particles=args.n_particles, n_cells=args.n_cells or None, n_samples=args.n_samples,
        mode=args.mode, seed=args.seed,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out)
    a = frame.attrs
    print(f"wrote {out}: {a['n_de']} of {len(frame)} genes DE ({a['perturbation']} vs {a['control']}, "
          f"{a['method']}, |LFC| > {a['delta']:g} log2, posterior expected FDR {a['expected_fdr']:.3f} "
          f"<= {a['fdr']:g}; {a['n_cells_a']} vs {a['n_cells_b']} cells)")
    if args.plot:
        from .evaluate.plots import volcano_plot

        print(f"wrote {volcano_plot(frame, args.plot)}")
    return 0


def add_de_parser(sub) -> None:
    """The ``de`` subcommand: model-based differential expression of one perturbation."""
    # evaluate.de's DEFAULT_DELTA, METHODS and MODES, written out: building the parser
    # imports no torch (tests/test_de.py checks that they agree)
    DEFAULT_DELTA, METHODS, MODES = 0.25, ("importance", "plain"), ("group", "pairs")
    p = sub.add_parser("de", help="model-based differential expression of a perturbation's cells against the "
                       "control's: per-gene LFC, P(|LFC| > delta) and decisions at posterior expected FDR, as CSV")
    p.add_argument("run_dir")
    p.add_argument("--perturbation", required=True, help="label of the perturbed group, e.g. 'A' or 'A+B'")
    p.add_argument("--control", help="label of the reference group (default: the run's control label)")
    p.add_argument("--data", help=".h5ad holding both groups' cells (default: the run's training data)")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="effect-size threshold on |LFC|, log2 units "
                   f"(default {DEFAULT_DELTA})")
    p.add_argument("--fdr", type=float, default=0.05, help="target posterior expected FDR (default 0.05)")
    p.add_argument("--method", choices=METHODS, default="importance",
                   help="'importance' (self-normalised importance sampling against the model; default) or 'plain' "
                   "(the guide as the posterior)")
    p.add_argument("--mode", choices=MODES, default="group",
                   help="LFC of the groups' mean expression ('group', default) or of random cell pairs ('pairs')")
    p.add_argument("--n-particles", type=int, default=20, help="importance particles per cell and draw")
    p.add_argument("--n-samples", type=int, default=50, help="posterior draws")
    p.add_argument("--n-cells", type=int, default=300, help="at most this many cells per group (0: all)")
    p.add_argument("--out", required=True, help="output CSV (one row per gene)")
    p.add_argument("--plot", help="also write a volcano plot (PNG) there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_de)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .infer import TrainingDivergedError

        if not isinstance(e, TrainingDivergedError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
