"""Model-based differential expression with decisions that hold (docs/evaluation.md,
"Differential expression").

1. ``combinatorial`` simulates perturbed and control cells; its ground truth (the true
   decoder and every cell's true latent) gives each gene's true log fold change.
2. A model is trained with ``fit`` (the conditional VAE by default).
3. ``run.differential_expression`` computes, per gene, the posterior mean log2 fold change
   of one perturbation's cells against the control's, ``P(|LFC| > delta)`` and the decision
   set at posterior expected FDR ``--fdr``: once with the guide as the posterior
   (``plain``) and once with self-normalised importance sampling against the model
   (``importance``). Both are scored against the truth (false discovery proportion and
   power) and written as CSV with a volcano plot.

    python examples/differential_expression.py            # a minute on a CPU
    python examples/differential_expression.py --tiny     # seconds: a smoke test
    python examples/differential_expression.py --help
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pyro_perturb.data import simulate
from pyro_perturb.evaluate.plots import volcano_plot
from pyro_perturb.run import fit


def true_lfc(adata, frame) -> np.ndarray:
    """The true group LFC of the cells the frame used: log2(mean 1e4 rho(z_true) + 1), A minus B."""
    decoder = adata.uns["ground_truth"]["decoder"]
    z = np.asarray(adata.obsm["z_true"], dtype=np.float64)
    a = simulate.decoder_proportions(decoder, z[frame.attrs["cells_a"]]).mean(0) * 1e4
    b = simulate.decoder_proportions(decoder, z[frame.attrs["cells_b"]]).mean(0) * 1e4
    return np.log2(a + 1) - np.log2(b + 1)


def main(args) -> dict:
    torch.set_num_threads(1)
    if args.tiny:
        sizes = dict(n_singles=2, n_doubles=0, n_genes=30, cells_per_perturbation=60, n_control_cells=80, n_ate_draws=5)
        settings = dict(max_epochs=20, n_latent=4, n_hidden=16)
        particles, samples = 5, 10
    else:
        sizes = dict(n_singles=4, n_doubles=0, n_genes=200, cells_per_perturbation=150, n_control_cells=400, n_ate_draws=5)
        settings = dict(max_epochs=100, n_latent=10, n_hidden=64)
        particles, samples = 20, 40

    # 1. simulate
    adata = simulate.combinatorial(seed=args.seed, **sizes)
    label = args.perturbation
    print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes; DE of {label} vs control")

    # 2. train
    run = fit(adata, model=args.model, seed=args.seed, **settings)

    # 3. DE with both posteriors, scored against the truth
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in ("plain", "importance"):
        frame = run.differential_expression(label, delta=args.delta, fdr=args.fdr, method=method, data=adata,
                                            n_particles=particles, n_samples=samples, seed=args.seed)
        truth = np.abs(true_lfc(adata, frame)) > args.delta
        called = frame["is_de"].to_numpy()
        fdp = float((called & ~truth).sum() / max(called.sum(), 1))
        power = float((called & truth).sum() / max(truth.sum(), 1))
        frame.to_csv(out / f"de_{method}.csv")
        volcano_plot(frame, out / f"volcano_{method}.png")
        results[method] = {"n_de": int(called.sum()), "expected_fdr": frame.attrs["expected_fdr"],
                           "false_discovery_proportion": fdp, "power": power, "n_true_de": int(truth.sum())}
    print(f"\n{'method':<11} {'DE':>4} {'expected FDR':>13} {'true FDP':>9} {'power':>6}   (target FDR {args.fdr:g})")
    for method, r in results.items():
        print(f"{method:<11} {r['n_de']:4d} {r['expected_fdr']:13.3f} {r['false_discovery_proportion']:9.3f} "
              f"{r['power']:6.2f}")
    print(f"wrote {out}/de_*.csv and volcano_*.png")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvae", help="registered model (any with a dosage, e.g. sams_vae)")
    parser.add_argument("--perturbation", default="p000")
    parser.add_argument("--delta", type=float, default=0.25, help="|LFC| threshold, log2 units")
    parser.add_argument("--fdr", type=float, default=0.1, help="target posterior expected FDR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="de_example_out")
    parser.add_argument("--tiny", action="store_true", help="tiny settings (seconds; smoke test)")
    main(parser.parse_args())
