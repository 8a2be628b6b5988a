"""The integrated log-normalised expression (evaluate/expected_lognorm.py): accuracy,
speed, and the count noise it removes.

* **accuracy**: ``expected_log_normalized`` against ``exact_expected_log_normalized``
  (exact summation over the count pmfs, ~1e-10) on cells of varied depth (library 20 to
  1e4), gene count, dispersion (theta 0.05 to 200, Poisson), dominance and ``scale``;
  max absolute error over genes and cells, per ``tol``, in float64 and float32.
* **speed**: time per cell (1,187 genes, data-like profile with dominant genes) of the
  integrated value against one sampled cell (torch's Gamma-Poisson NB, as the model ATE
  draws it, then normalised and ``log2(1 + .)``), in ``--threads`` threads; min of
  ``--repeats`` runs.
* **count noise**: the per-gene variance of one sampled cell's statistic given its
  parameters (what the integrated value removes), by Monte Carlo.

Usage::

    python bench/expected_lognorm_benchmark.py [--threads 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pyro_perturb.evaluate.expected_lognorm import exact_expected_log_normalized, expected_log_normalized


def profile(n_genes: int, depth: float, theta_range: tuple[float, float] | None, seed: int, dominant: float = 4.0,
            spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expected counts ``depth * rho`` (log-normal ``rho``, three genes boosted by
    ``e^dominant``) and a log-uniform theta (None: Poisson)."""
    rng = np.random.default_rng(seed)
    log_rho = rng.normal(0.0, spread, n_genes)
    log_rho[:3] += dominant
    rho = np.exp(log_rho - log_rho.max())
    mean = torch.tensor(depth * rho / rho.sum(), dtype=torch.float64)
    if theta_range is None:
        return mean, None
    lo, hi = theta_range
    return mean, torch.tensor(np.exp(rng.uniform(math.log(lo), math.log(hi), n_genes)), dtype=torch.float64)


ACCURACY_CASES = [
    # (genes, library, theta range or None, dominant boost, scale)
    (3, 0.2, (0.5, 5.0), 0.0, 1e4),  # P(T = 0) ~ 0.8
    (3, 5.0, (0.05, 1.0), 2.0, 1e4),
    (100, 20.0, (0.05, 2.0), 4.0, 1e4),
    (250, 120.0, (0.5, 20.0), 4.0, 1e4),
    (250, 120.0, None, 4.0, 1e4),
    (250, 120.0, (5.0, 200.0), 6.0, 1e4),
    (250, 120.0, (0.5, 20.0), 4.0, 1e2),
    (250, 120.0, (0.5, 20.0), 4.0, 1e6),
    (500, 1000.0, (0.5, 20.0), 4.0, 1e4),
    (300, 1e4, (0.5, 20.0), 4.0, 1e4),
    (300, 1e4, None, 4.0, 1e4),
]


def accuracy(tols=(1e-3, 1e-4, 1e-6), seeds=(0, 1)) -> list[dict]:
    rows = []
    for genes, depth, theta_range, dominant, scale in ACCURACY_CASES:
        for seed in seeds:
            mean, theta = profile(genes, depth, theta_range, seed, dominant)
            exact = exact_expected_log_normalized(mean, theta, scale=scale)
            for tol in tols:
                err = {}
                for dtype in (torch.float64, torch.float32):
                    value = expected_log_normalized(mean.to(dtype), None if theta is None else theta.to(dtype), scale=scale, tol=tol)
                    err[str(dtype).split(".")[-1]] = float((value.double() - exact).abs().max())
                rows.append(dict(genes=genes, library=depth, theta=theta_range, dominant=dominant, scale=scale, seed=seed,
                                 tol=tol, max_exact=float(exact.max()), **err))
    return rows


def sampled_cells(mean: torch.Tensor, theta: torch.Tensor | None, scale: float, generator: torch.Generator) -> torch.Tensor:
    """One sampled cell per row of ``mean``, normalised: as the model ATE draws it."""
    if theta is None:
        x = torch.poisson(mean, generator=generator)
    else:
        gamma = torch._standard_gamma(theta.expand(mean.shape).contiguous(), generator=generator)
        x = torch.poisson(gamma.clamp_min_(torch.finfo(gamma.dtype).tiny).mul_(mean / theta), generator=generator)
    total = x.sum(-1, keepdim=True).clamp_min_(1.0)
    return x.mul_(scale / total).add_(1.0).log2_()


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def speed(cells: int, repeats: int, seed: int = 0) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for depth in (120.0, 1e3, 1e4, 1e5):
        for poisson in (False, True):
            mean, theta = profile(1187, depth, None if poisson else (0.5, 20.0), seed)
            mean, theta = mean.float(), None if theta is None else theta.float()
            # cells of one batch differ (like particles): a log-normal jitter per gene
            means = mean * torch.exp(0.3 * torch.randn(cells, mean.shape[0], generator=gen))
            means = means / means.sum(-1, keepdim=True) * depth
            draw = _best(lambda: sampled_cells(means, theta, 1e4, gen), repeats)
            row = dict(library=depth, family="Poisson" if poisson else "NB", draw_us=draw / cells * 1e6)
            for tol in (1e-4, 1e-6):
                t = _best(lambda: expected_log_normalized(means, theta, tol=tol), repeats)
                row[f"tol{tol:g}_us"] = t / cells * 1e6
                row[f"tol{tol:g}_draws"] = t / draw
            rows.append(row)
    return rows


def count_noise(draws: int = 4000, seed: int = 0) -> list[dict]:
    """Per-gene variance of one sampled cell's statistic given its parameters."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for depth in (120.0, 1e3, 1e4):
        mean, theta = profile(1187, depth, (0.5, 20.0), seed)
        x = sampled_cells(mean.float().expand(draws, -1).contiguous(), theta.float(), 1e4, gen).double()
        var = x.var(0)
        m = expected_log_normalized(mean, theta)
        rows.append(dict(library=depth, var_mean=float(var.mean()), var_median=float(var.median()), var_max=float(var.max()),
                         value_mean=float(m.mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# Integrated log-normalised expression: accuracy, speed, count noise", "",
             f"`python bench/expected_lognorm_benchmark.py --threads {args.threads} --cells {args.cells}` - "
             f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s).", "",
             "## Accuracy: max |integrated - exact| over genes (log2 units)", "",
             "| genes | library | theta | dominant | scale | tol | float64 (max over seeds) | float32 | max value |",
             "|---|---|---|---|---|---|---|---|---|"]
    acc = accuracy()
    keys = sorted({(r["genes"], r["library"], str(r["theta"]), r["dominant"], r["scale"], r["tol"]) for r in acc},
                  key=lambda k: (k[1], k[0], k[2], k[4], -k[5]))
    for key in keys:
        sel = [r for r in acc if (r["genes"], r["library"], str(r["theta"]), r["dominant"], r["scale"], r["tol"]) == key]
        theta = "Poisson" if key[2] == "None" else key[2]
        lines.append(f"| {key[0]} | {key[1]:g} | {theta} | {key[3]:g} | {key[4]:g} | {key[5]:g} | "
                     f"{max(r['float64'] for r in sel):.1e} | {max(r['float32'] for r in sel):.1e} | {max(r['max_exact'] for r in sel):.2f} |")
    for tol in (1e-3, 1e-4, 1e-6):
        worst = max(r["float64"] for r in acc if r["tol"] == tol)
        worst32 = max(r["float32"] for r in acc if r["tol"] == tol)
        lines.append("")
        lines.append(f"tol {tol:g}: worst float64 error {worst:.2e} ({worst / tol:.2f} tol), float32 {worst32:.2e}.")
    print("\n".join(lines), flush=True)
    sp = speed(args.cells, args.repeats)
    block = ["", f"## Speed: microseconds per cell (1,187 genes; {args.cells} cells per call)", "",
             "| library | family | one sampled draw | integrated tol 1e-4 | (in draws) | integrated tol 1e-6 | (in draws) |",
             "|---|---|---|---|---|---|---|"]
    for r in sp:
        block.append(f"| {r['library']:g} | {r['family']} | {r['draw_us']:.0f} | {r['tol0.0001_us']:.0f} | {r['tol0.0001_draws']:.2f} | "
                     f"{r['tol1e-06_us']:.0f} | {r['tol1e-06_draws']:.2f} |")
    noise = count_noise()
    block += ["", "## Count noise removed: variance of one sampled cell's statistic, per gene", "",
              "| library | mean over genes | median | max | mean expected value |", "|---|---|---|---|---|"]
    for r in noise:
        block.append(f"| {r['library']:g} | {r['var_mean']:.3f} | {r['var_median']:.3f} | {r['var_max']:.3f} | {r['value_mean']:.3f} |")
    print("\n".join(block), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "expected_lognorm.md").write_text("\n".join(lines + block) + "\n")


if __name__ == "__main__":
    main()
