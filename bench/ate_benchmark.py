"""Model effects by posterior predictive: time, precision and peak memory of the estimators.

A Replogle-shaped SAMS-VAE (correlated guide; 1,187 genes, latent 100, hidden 400, 1
hidden layer) is built for T treatments (200 or 700 single-gene perturbations) on
``simulate.combinatorial`` data (T singles x ``--cells`` cells, 10% controls, library
around 3,000; ``--depth shallow``: around 150) and trained for ``--train-steps`` ELBO steps
(batch 512, 5 particles, lr 1e-3; default 100 steps: enough for realistic, uneven gene
means, far from a trained model), then saved with the training cells' library-size
distribution (:func:`pyro_perturb.evaluate.depth.library_distribution`). Each timed
measurement runs in a fresh subprocess that loads the weights and times one
``model_effects`` call over T treatments, recording peak RSS (``VmHWM`` of
``/proc/self/status``, minus the RSS before the call: the working memory), and
``torch.cuda.max_memory_allocated`` on CUDA.

Variants (``--variants``), each at each library (``--libraries``: ``fixed``, every cell at
1e4, the paper's statistic; ``observed``, libraries drawn from the training cells' pools
per label):

* ``sampled``, ``integrated``: the two estimators of ``model_effects`` (count noise drawn
  once per particle, or integrated out), in ``--threads`` threads;
* ``baseline``: the model ATE as committed before the per-row streams (``--baseline-ref``,
  read with ``git show``; fixed library only); ``rows1`` / ``rows``: the sampled
  estimator in 1 / ``--threads`` threads (fixed library; the names of earlier results).

Precision (unless ``--no-precision``): for each estimator and library, the seed-to-seed
standard deviation of the ATE per gene (over ``--precision-seeds`` seeds, averaged over
genes and the first ``--precision-treatments`` treatments) at a few particle counts
(``--precision-particles-sampled``, ``--precision-particles-integrated``); with SD(P) = c /
sqrt(P) fitted to them (c: the geometric mean of SD * sqrt(P)), the particle count at
which each estimator reaches the sampled estimator's SD at ``--target-particles`` (2,500),
``ceil(2500 * (c / c_sampled)^2)``, and the time and peak memory of one call at that
count over T treatments. Results: ``--out``/ate_benchmark.md and .json.

Usage::

    python bench/ate_benchmark.py                       # all configurations
    python bench/ate_benchmark.py --configs 200x500 --variants sampled integrated --libraries fixed
    python bench/ate_benchmark.py --configs 700x2500 --variants rows --memory-mb 256 1024 4096 --no-precision
    python bench/ate_benchmark.py --configs 20x200 --train-steps 5 --cells 5 --precision-treatments 5 \
        --precision-seeds 3 --target-particles 200 --out /tmp/ate_bench    # a quick check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_GENES, N_LATENT, N_HIDDEN = 1187, 100, 400
DEFAULT_CONFIGS = ["200x2500", "700x2500"]
VARIANTS = ("sampled", "integrated", "baseline", "rows1", "rows")
ESTIMATORS = ("sampled", "integrated")
LIBRARIES = ("fixed", "observed")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _data_and_model(n_treatments: int, cells: int, seed: int = 0, depth: str | None = None):
    import pyro

    import pyro_perturb as pp
    from pyro_perturb.registry import build

    adata = pp.simulate.combinatorial(
        seed=seed, n_singles=n_treatments, n_doubles=0, cells_per_perturbation=cells,
        n_control_cells=max(50, n_treatments * cells // 10), n_genes=N_GENES, n_ate_draws=10, depth=depth,
    )
    data = pp.PerturbationData.from_anndata(adata)
    pyro.set_rng_seed(seed)
    model, guide, _ = build("sams_vae", data.spec, {"n_latent": N_LATENT, "n_hidden": N_HIDDEN},
                            gene_stats=data.gene_stats("train"))
    return data, model, guide


def _depth_path(weights: Path) -> Path:
    return weights.with_suffix(".depth.json")


def train_and_save(n_treatments: int, args, path: Path) -> dict:
    """Build the model for ``n_treatments``, train ``args.train_steps`` steps, save it and
    the training cells' library-size distribution."""
    import numpy as np
    import torch

    from pyro_perturb.evaluate.depth import library_distribution
    from pyro_perturb.infer.engine import make_elbo

    data, model, guide = _data_and_model(n_treatments, args.cells, depth=args.depth)
    _depth_path(path).write_text(json.dumps(library_distribution(data)))
    elbo = make_elbo("trace", 5, model.max_plate_nesting)
    params = list(model.parameters()) + list(guide.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    batches = [b for b in data.batches("train", 512, shuffle=True) if b.size == 512] or list(data.batches("train", 512))
    t0 = time.perf_counter()
    loss = torch.zeros(())
    for i in range(args.train_steps):
        loss = elbo.differentiable_loss(model, guide, batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": model.state_dict(), "guide": guide.state_dict()}, path)
    # spread of the NB means at library 1e4: what the count sampler sees
    with torch.no_grad():
        z = torch.randn(256, N_LATENT)
        mean = 1e4 * torch.softmax(model.decoder(z), -1)
    q = torch.quantile(mean.flatten()[:1_000_000], torch.tensor([0.1, 0.5, 0.9, 0.99])).tolist()
    return {"train_steps": args.train_steps, "train_seconds": time.perf_counter() - t0,
            "final_loss": float(loss.detach()), "nb_mean_quantiles_10_50_90_99": [round(v, 2) for v in q],
            "frac_nb_mean_ge_10": float((mean >= 10).float().mean()), "theta_median": float(model.likelihood.theta.detach().median()),
            "library_median": float(np.median(data.library[data.indices("train")]))}


def _baseline_model_ate(ref: str):
    """``model_ate`` of pyro_perturb/evaluate/ate.py as committed at ``ref`` (before the
    model ATE moved to evaluate/predictive.py)."""
    src = subprocess.run(["git", "show", f"{ref}:pyro_perturb/evaluate/ate.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "_ate_baseline.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("pyro_perturb.evaluate._ate_baseline", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.model_ate


def _loaded(job: dict):
    """The trained model of ``job`` on its device, its spec, the treatments and the library."""
    import torch

    import pyro_perturb as pp
    from pyro_perturb.evaluate.depth import library_pools
    from pyro_perturb.registry import build

    n_treatments = job["treatments"]
    adata = pp.simulate.combinatorial(seed=0, n_singles=n_treatments, n_doubles=0, cells_per_perturbation=2,
                                      n_control_cells=50, n_genes=N_GENES, n_ate_draws=10)
    spec = pp.PerturbationData.from_anndata(adata).spec
    model, guide, _ = build("sams_vae", spec, {"n_latent": N_LATENT, "n_hidden": N_HIDDEN})
    state = torch.load(job["weights"])
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    device = torch.device(job.get("device", "cpu"))
    model.to(device)
    guide.to(device)
    labels = list(spec.perturbations)[:n_treatments]
    library = 1e4
    if job.get("library", "fixed") == "observed":
        distribution = json.loads(_depth_path(Path(job["weights"])).read_text())
        library = library_pools(distribution, [spec.control, *labels])
    return model, guide, spec, labels, library, device


def measure_precision(job: dict) -> dict:
    """Seed-to-seed SD of the ATE per gene (mean over genes and the first treatments) of
    one estimator at each particle count of ``job["particle_counts"]``."""
    import numpy as np
    import torch

    from pyro_perturb.evaluate.predictive import model_effects

    torch.set_num_threads(job["threads"])
    model, guide, spec, labels, library, device = _loaded(job)
    labels = labels[: job["precision_treatments"]]
    if isinstance(library, dict):
        library = {lab: library[lab] for lab in [spec.control, *labels]}
    out = {}
    for particles in job["particle_counts"]:
        ates = [model_effects(model, guide, spec, labels, library=library, num_particles=particles, seed=1000 + s,
                              estimator=job["estimator"], device=device).ate.to_numpy()
                for s in range(job["seeds"])]
        out[str(particles)] = float(np.std(np.stack(ates), axis=0, ddof=1).mean())
    return {**{k: v for k, v in job.items() if k != "weights"}, "sd": out}


def measure_one(job: dict) -> dict:
    """One timed model-effects call (runs in its own process)."""
    import torch

    torch.set_num_threads(job["threads"])
    if job.get("kind") == "precision":
        return measure_precision(job)
    from pyro_perturb.evaluate.predictive import model_effects

    model, guide, spec, labels, library, device = _loaded(job)
    particles = job["particles"]
    variant = job["variant"]
    if variant == "baseline":
        baseline = _baseline_model_ate(job["baseline_ref"])

        def fn(**kwargs):
            return baseline(model, guide, spec, labels, num_particles=particles, seed=0, device=device)
    else:
        estimator = "integrated" if variant == "integrated" else "sampled"
        threads = 1 if variant == "rows1" else job["threads"]

        def fn(**kwargs):
            return model_effects(model, guide, spec, labels, library=library, num_particles=particles, seed=0,
                                 estimator=estimator, device=device, num_threads=threads, **kwargs).ate
    kwargs = {"memory_mb": job["memory_mb"]} if job.get("memory_mb") is not None else {}
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
    if job.get("profile"):
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    ate = fn(**kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    out = {**{k: v for k, v in job.items() if k not in ("weights",)}, "seconds": seconds, "cpu_seconds": cpu_seconds,
           "rss_before_mb": rss0 / 1024, "peak_rss_mb": _status_kb("VmHWM") / 1024,
           "hwm_before_mb": hwm0 / 1024, "ate_abs_mean": float(abs(ate.to_numpy()).mean())}
    out["working_peak_mb"] = out["peak_rss_mb"] - out["rss_before_mb"]
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if job.get("profile"):
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        out["profile"] = buf.getvalue()
    return out


def run_job(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(job["threads"])})
    if proc.returncode != 0:
        raise RuntimeError(f"job {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def particles_for_precision(sd: dict[str, float]) -> float:
    """c of SD(P) = c / sqrt(P): the geometric mean of SD * sqrt(P) over the counts measured."""
    import numpy as np

    return float(np.exp(np.mean([np.log(v) + 0.5 * np.log(int(p)) for p, v in sd.items() if v > 0])))


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ate_benchmark.json").write_text(json.dumps(results, indent=1))
    lines = ["# Model effects by posterior predictive: time, precision and peak memory", "",
             f"Machine: {results['machine']}; torch threads {results['threads']}; device {results['device']}; "
             f"model: {results['model']}.", "",
             "Working peak = VmHWM after the call minus VmRSS before it (fresh process per row). "
             "Ratios: baseline seconds / variant seconds, same configuration, same invocation.", "",
             "| invocation | threads | config | variant | library | budget MB | wall s | CPU s | wall vs baseline | CPU vs baseline | working peak MB | peak RSS MB | CUDA MB | mean abs ATE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        base = next((b for b in results["runs"] if b["variant"] == "baseline" and b["config"] == r["config"]
                     and b.get("invocation") == r.get("invocation")), None)
        ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
        cpu_ratio = f"{base['cpu_seconds'] / r['cpu_seconds']:.2f}x" if base else "-"
        cuda = f"{r['cuda_max_allocated_mb']:.0f}" if "cuda_max_allocated_mb" in r else "-"
        lines.append(f"| {r.get('invocation', '-')} | {r['threads']} | {r['config']} | {r['variant']} | {r.get('library', 'fixed')} | "
                     f"{r.get('memory_mb') or '-'} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {ratio} | {cpu_ratio} | "
                     f"{r['working_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | {cuda} | {r['ate_abs_mean']:.4f} |")
    if results.get("precision"):
        lines += ["", "## Time to the sampled estimator's precision", "",
                  "SD: seed-to-seed standard deviation of the ATE per gene, mean over genes and treatments; "
                  "c = SD * sqrt(P) (geometric mean over the counts measured); particles needed = "
                  "target particles * (c / c_sampled)^2; time and working peak: one call over all T treatments "
                  "at that particle count.", "",
                  "| config | library | estimator | SD at particles | c | particles needed | wall s | working peak MB | speed-up vs sampled |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in results["precision"]:
            sd = ", ".join(f"{v:.4f} @ {k}" for k, v in p["sd"].items())
            ref = next((q for q in results["precision"] if q["config"] == p["config"] and q["library"] == p["library"]
                        and q["estimator"] == "sampled" and q.get("timed")), None)
            speed = f"{ref['timed']['seconds'] / p['timed']['seconds']:.1f}x" if ref and p.get("timed") else "-"
            timed = p.get("timed") or {}
            lines.append(f"| {p['config']} | {p['library']} | {p['estimator']} | {sd} | {p['c']:.4f} | {p['particles_needed']} | "
                         f"{timed.get('seconds', float('nan')):.1f} | {timed.get('working_peak_mb', float('nan')):.0f} | {speed} |")
    for T, info in results.get("training", {}).items():
        lines += ["", f"Model for {T} treatments: {json.dumps(info)}"]
    if results.get("profile"):
        lines += ["", "## Profile (cProfile, tottime)", "", "```", results["profile"], "```"]
    (out / "ate_benchmark.md").write_text("\n".join(lines) + "\n")


def main(args) -> dict:
    import platform

    import torch

    out = Path(args.out)
    cache = Path(tempfile.gettempdir()) / "pyro_perturb_ate_benchmark"
    cache.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "threads": args.threads, "device": args.device,
               "model": f"sams_vae (correlated), {N_GENES} genes, latent {N_LATENT}, hidden {N_HIDDEN}, "
                        f"{args.train_steps} training steps, depth {args.depth or 'standard'}",
               "runs": [], "precision": [], "training": {}}
    prev = out / "ate_benchmark.json"
    if args.append and prev.exists():
        old = json.loads(prev.read_text())
        for key in ("runs", "precision", "training"):
            results[key] = old.get(key, results[key])
    weights = {}
    for cfg in args.configs:
        T = int(cfg.split("x")[0])
        path = cache / f"sams_vae_T{T}_steps{args.train_steps}_cells{args.cells}_{args.depth or 'standard'}.pt"
        if not path.exists() or not _depth_path(path).exists():
            torch.set_num_threads(args.threads)
            results["training"][str(T)] = train_and_save(T, args, path)
        weights[T] = str(path)
    base_job = {"threads": args.threads, "baseline_ref": args.baseline_ref, "device": args.device}
    if args.profile:
        T0 = 200 if 200 in weights else next(iter(weights))
        job = {**base_job, "treatments": T0, "particles": 200, "variant": args.profile, "library": "fixed",
               "weights": weights[T0], "config": f"{T0}x200", "profile": True}
        results["profile"] = run_job(job)["profile"]
        print(results["profile"], flush=True)
    for cfg in args.configs:
        T, P = (int(v) for v in cfg.split("x"))
        jobs = []
        for variant in args.variants:
            for library in args.libraries if variant in ESTIMATORS else ["fixed"]:
                jobs.append((variant, library, None))
        jobs += [("rows", "fixed", mb) for mb in args.memory_mb or []]
        for variant, library, mb in jobs:
            job = {**base_job, "treatments": T, "particles": P, "variant": variant, "library": library,
                   "weights": weights[T], "config": cfg, "memory_mb": mb}
            r = run_job(job)
            results["runs"].append(r)
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
            write_report(results, out)
        if not args.precision:
            continue
        for library in args.libraries:
            measured = {}
            for estimator in ESTIMATORS:
                counts = args.precision_particles_sampled if estimator == "sampled" else args.precision_particles_integrated
                job = {**base_job, "kind": "precision", "treatments": T, "weights": weights[T], "library": library,
                       "estimator": estimator, "particle_counts": counts, "seeds": args.precision_seeds,
                       "precision_treatments": min(T, args.precision_treatments)}
                measured[estimator] = run_job(job)["sd"]
                print(json.dumps({"precision": estimator, "library": library, "sd": measured[estimator]}), flush=True)
            c_sampled = particles_for_precision(measured["sampled"])
            for estimator in ESTIMATORS:
                c = particles_for_precision(measured[estimator])
                needed = max(1, math.ceil(args.target_particles * (c / c_sampled) ** 2))
                entry = {"config": cfg, "library": library, "estimator": estimator, "sd": measured[estimator], "c": c,
                         "target_particles": args.target_particles, "particles_needed": needed}
                job = {**base_job, "treatments": T, "particles": needed, "variant": estimator, "library": library,
                       "weights": weights[T], "config": f"{T}x{needed}", "memory_mb": None}
                entry["timed"] = run_job(job)
                results["precision"].append(entry)
                print(json.dumps({k: v for k, v in entry.items() if k != "timed"} | {"seconds": entry["timed"]["seconds"]}), flush=True)
                write_report(results, out)
    write_report(results, out)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="TREATMENTSxPARTICLES")
    p.add_argument("--variants", nargs="*", default=list(ESTIMATORS), choices=VARIANTS)
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES,
                   help="fixed: every cell at 1e4; observed: the training cells' pools per label")
    p.add_argument("--memory-mb", type=float, nargs="*", help="also run 'rows' at these working-memory budgets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--cells", type=int, default=20, help="cells per treatment for the short training")
    p.add_argument("--depth", choices=["standard", "shallow"], default=None, help="simulated sequencing depth")
    p.add_argument("--no-precision", dest="precision", action="store_false", help="skip the time-to-precision part")
    p.add_argument("--precision-treatments", type=int, default=20, help="treatments whose ATE SD is measured")
    p.add_argument("--precision-seeds", type=int, default=4)
    p.add_argument("--precision-particles-sampled", type=int, nargs="+", default=[100, 400])
    p.add_argument("--precision-particles-integrated", type=int, nargs="+", default=[10, 40, 160])
    p.add_argument("--target-particles", type=int, default=2500, help="the sampled estimator's particles to match")
    p.add_argument("--baseline-ref", default="23a4da2", help="git revision of the baseline ate.py")
    p.add_argument("--profile", nargs="?", const="rows1", choices=VARIANTS,
                   help="print a cProfile of this variant (default rows1; 200 treatments x 200 particles)")
    p.add_argument("--append", action="store_true", help="add to the runs already in OUT/ate_benchmark.json")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args()
    if ns.job:
        print(json.dumps(measure_one(json.loads(ns.job))))
    else:
        main(ns)
