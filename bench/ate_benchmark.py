"""Model ATE by posterior predictive: time and peak memory per sampler variant and memory budget.

A Replogle-shaped SAMS-VAE (correlated guide; 1,187 genes, latent 100, hidden 400, 1
hidden layer) is built for T treatments (200 or 700 single-gene perturbations) on
``simulate.combinatorial`` data (T singles x ``--cells`` cells, 10% controls, library
around 3,000) and trained for ``--train-steps`` ELBO steps (batch 512, 5 particles,
lr 1e-3; default 100 steps: enough for realistic, uneven gene means, far from a trained
model), then saved. Each measurement runs in a fresh subprocess that loads the weights
and times one ``model_ate`` call over T treatments, recording peak RSS (``VmHWM`` of
``/proc/self/status``, minus the RSS before the call: the ATE's working memory), and
``torch.cuda.max_memory_allocated`` on CUDA.

Variants (``--variants``; ratios are against ``baseline`` of the same invocation):

* ``baseline``: the model ATE as committed before this work (``--baseline-ref``, read
  with ``git show``): one ``Predictive(model, guide)`` per chunk of 64 treatments (control
  row in each chunk), torch's NB sampler, float64 normalisation.
* ``pyro``: the current code with ``sampler="pyro"``: globals drawn once per particle
  block and shared by all treatment batches, the control once, float32 in-place
  normalisation, but every site still sampled by Pyro (torch's samplers).
* ``rows1``: the current default sampler (per-row seeded streams, numpy's PCG64
  gamma/Poisson on CPU) in 1 thread; ``rows``: the same in ``--threads`` threads.

``--memory-mb`` runs ``rows`` at the given budgets (the treatment batch then comes from
the budget) so that peak RSS can be compared with it. ``--profile`` prints a cProfile of
``rows1`` on a small configuration. Results: ``--out``/ate_benchmark.md and .json.

Usage::

    python bench/ate_benchmark.py                       # all configurations
    python bench/ate_benchmark.py --configs 200x500 --variants baseline rows
    python bench/ate_benchmark.py --configs 700x2500 --variants rows --memory-mb 256 1024 4096
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_GENES, N_LATENT, N_HIDDEN = 1187, 100, 400
DEFAULT_CONFIGS = ["200x500", "200x2500", "700x2500"]
VARIANTS = ("baseline", "pyro", "rows1", "rows")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _data_and_model(n_treatments: int, cells: int, seed: int = 0):
    import pyro

    import pyro_perturb as pp
    from pyro_perturb.registry import build

    adata = pp.simulate.combinatorial(
        seed=seed, n_singles=n_treatments, n_doubles=0, cells_per_perturbation=cells,
        n_control_cells=max(50, n_treatments * cells // 10), n_genes=N_GENES, n_ate_draws=10,
    )
    data = pp.PerturbationData.from_anndata(adata)
    pyro.set_rng_seed(seed)
    model, guide, _ = build("sams_vae", data.spec, {"n_latent": N_LATENT, "n_hidden": N_HIDDEN},
                            gene_stats=data.gene_stats("train"))
    return data, model, guide


def train_and_save(n_treatments: int, args, path: Path) -> dict:
    """Build the model for ``n_treatments``, train ``args.train_steps`` steps, save."""
    import torch

    from pyro_perturb.infer.engine import make_elbo

    data, model, guide = _data_and_model(n_treatments, args.cells)
    elbo = make_elbo("trace", 5, model.max_plate_nesting)
    params = list(model.parameters()) + list(guide.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    batches = [b for b in data.batches("train", 512, shuffle=True) if b.size == 512]
    t0 = time.perf_counter()
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
            "frac_nb_mean_ge_10": float((mean >= 10).float().mean()), "theta_median": float(model.likelihood.theta.median())}


def _baseline_model_ate(ref: str):
    """``model_ate`` of pyro_perturb/evaluate/ate.py as committed at ``ref``."""
    src = subprocess.run(["git", "show", f"{ref}:pyro_perturb/evaluate/ate.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "_ate_baseline.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("pyro_perturb.evaluate._ate_baseline", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.model_ate


def measure_one(job: dict) -> dict:
    """One timed model-ATE call (runs in its own process)."""
    import torch

    torch.set_num_threads(job["threads"])
    import pyro_perturb as pp
    from pyro_perturb.evaluate.ate import model_ate
    from pyro_perturb.registry import build

    n_treatments, particles = job["treatments"], job["particles"]
    adata = pp.simulate.combinatorial(seed=0, n_singles=n_treatments, n_doubles=0, cells_per_perturbation=2,
                                      n_control_cells=50, n_genes=N_GENES, n_ate_draws=10)
    spec_data = pp.PerturbationData.from_anndata(adata)
    model, guide, _ = build("sams_vae", spec_data.spec, {"n_latent": N_LATENT, "n_hidden": N_HIDDEN})
    state = torch.load(job["weights"])
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    del adata, state
    device = torch.device(job.get("device", "cpu"))
    model.to(device)
    guide.to(device)
    labels = list(spec_data.spec.perturbations)[:n_treatments]
    variant = job["variant"]
    if variant == "baseline":
        fn, kwargs = _baseline_model_ate(job["baseline_ref"]), {}
    elif variant == "pyro":
        fn, kwargs = model_ate, {"sampler": "pyro"}
    elif variant == "rows1":
        fn, kwargs = model_ate, {"num_threads": 1}
    else:
        fn, kwargs = model_ate, {"num_threads": job["threads"]}
    if job.get("memory_mb") is not None:
        kwargs["memory_mb"] = job["memory_mb"]
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
    ate = fn(model, guide, spec_data.spec, labels, num_particles=particles, seed=0, device=device, **kwargs)
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


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ate_benchmark.json").write_text(json.dumps(results, indent=1))
    lines = ["# Model ATE by posterior predictive: time and peak memory", "",
             f"Machine: {results['machine']}; torch threads {results['threads']}; "
             f"model: {results['model']}.", "",
             "Working peak = VmHWM after the call minus VmRSS before it (fresh process per row). "
             "Ratios: baseline seconds / variant seconds, same configuration, same invocation.", "",
             "| invocation | threads | config | variant | budget MB | wall s | CPU s | wall vs baseline | CPU vs baseline | working peak MB | peak RSS MB | mean abs ATE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        base = next((b for b in results["runs"] if b["variant"] == "baseline" and b["config"] == r["config"]
                     and b.get("invocation") == r.get("invocation")), None)
        ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
        cpu_ratio = f"{base['cpu_seconds'] / r['cpu_seconds']:.2f}x" if base else "-"
        lines.append(f"| {r.get('invocation', '-')} | {r['threads']} | {r['config']} | {r['variant']} | {r.get('memory_mb') or '-'} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{ratio} | {cpu_ratio} | {r['working_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['ate_abs_mean']:.4f} |")
    for T, info in results.get("training", {}).items():
        lines += ["", f"Model for {T} treatments: {json.dumps(info)}"]
    if results.get("profile"):
        lines += ["", "## Profile (rows1, cProfile, tottime)", "", "```", results["profile"], "```"]
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
                        f"{args.train_steps} training steps", "runs": [], "training": {}}
    prev = out / "ate_benchmark.json"
    if args.append and prev.exists():
        old = json.loads(prev.read_text())
        results["runs"], results["training"] = old.get("runs", []), old.get("training", {})
    weights = {}
    for cfg in args.configs:
        T = int(cfg.split("x")[0])
        path = cache / f"sams_vae_T{T}_steps{args.train_steps}.pt"
        if not path.exists():
            torch.set_num_threads(args.threads)
            results["training"][str(T)] = train_and_save(T, args, path)
        weights[T] = str(path)
    if args.profile:
        job = {"treatments": 200, "particles": 200, "variant": "rows1", "threads": 1, "weights": weights.get(200) or next(iter(weights.values())),
               "baseline_ref": args.baseline_ref, "device": args.device, "config": "200x200", "profile": True}
        results["profile"] = run_job(job)["profile"]
        print(results["profile"], flush=True)
    for cfg in args.configs:
        T, P = (int(v) for v in cfg.split("x"))
        variants = [(v, None) for v in args.variants] + [("rows", mb) for mb in args.memory_mb or []]
        for variant, mb in variants:
            job = {"treatments": T, "particles": P, "variant": variant, "threads": args.threads, "weights": weights[T],
                   "baseline_ref": args.baseline_ref, "device": args.device, "config": cfg, "memory_mb": mb}
            r = run_job(job)
            results["runs"].append(r)
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
            write_report(results, out)
    write_report(results, out)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="TREATMENTSxPARTICLES")
    p.add_argument("--variants", nargs="*", default=["baseline", "pyro", "rows1", "rows"], choices=VARIANTS)
    p.add_argument("--memory-mb", type=float, nargs="*", help="also run 'rows' at these working-memory budgets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--cells", type=int, default=20, help="cells per treatment for the short training")
    p.add_argument("--baseline-ref", default="23a4da2", help="git revision of the baseline ate.py")
    p.add_argument("--profile", action="store_true")
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
