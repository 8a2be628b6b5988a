"""GPU figures of pyro-perturb (the Python part of bench/gpu_check.sh).

Three parts, each on ``--device`` (``cuda``; ``cpu`` for a dry run, with ``--tiny``):

* ``throughput``: training cells/s of SAMS-VAE, CPA-VAE and the conditional VAE at their
  registry settings (batch 512, 5 particles; latent 100, hidden 400 for the SAMS-VAE
  family) through the engine's step (:func:`pyro_perturb.infer.engine.training_step`),
  on a Replogle-shaped synthetic set (``bench/train_throughput.py``'s ``replogle_like``:
  ``--cells`` cells x ``--genes`` genes, 200 singles): the median over
  ``--throughput-reps`` rounds of ``--throughput-steps`` timed steps, after warm-up steps.
* ``ate``: the model ATE (``model_effects``) of a SAMS-VAE (correlated guide) trained for
  ``--ate-train-steps`` steps on a Replogle-shaped set with ``--ate-treatments`` singles,
  over all of them at ``--ate-particles`` particles, per estimator (integrated, sampled):
  seconds, ``torch.cuda.max_memory_allocated`` and the treatment batch that the memory
  model (:func:`~pyro_perturb.evaluate.ate_memory.ate_batch_for_memory`) takes for the
  budget ``--budget-mb``.
* ``compare``: the ATE on ``--device`` against the CPU's, within Monte Carlo error, at a
  small size (an untrained tiny SAMS-VAE; ``--compare-seeds`` seeds of
  ``--compare-particles`` particles per device, estimator and library, other seeds on
  each side): per treatment and gene,
  ``z = (mean_device - mean_cpu) / sqrt((sd_device^2 + sd_cpu^2) / seeds)`` over seeds;
  it passes when the mean of ``z^2`` is below 3 and ``max |z|`` below 8.

Writes ``gpu_check.json`` and the same figures as a Markdown table (``gpu_check`` +
``.md``) into ``--out`` (default: the ``gpu`` folder of the benchmark results). Exit status
1 when ``compare`` fails.

    python bench/gpu_check.py --device cuda               # on a GPU machine (bench/gpu_check.sh)
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_dry   # the dry run (seconds)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu"
THROUGHPUT_MODELS = ("sams_vae", "cpa_vae", "cvae")
TINY = dict(cells=600, genes=40, throughput_steps=2, throughput_reps=1, throughput_warmup=1, singles=8,
            ate_treatments=6, ate_particles=20, ate_train_steps=2, ate_cells=300, budget_mb=512,
            compare_particles=30, compare_seeds=4, n_latent=6, n_hidden=16)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _replogle_like(n_cells: int, n_genes: int, n_singles: int, seed: int = 0):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from train_throughput import replogle_like
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import pyro_perturb as pp

    return pp.PerturbationData.from_anndata(replogle_like(n_cells, n_genes, n_singles, 0.1, seed))


def _hparams(name: str, args) -> dict:
    from pyro_perturb.registry import get_entry

    known = get_entry(name).hyperparameters()
    return {k: v for k, v in (("n_latent", args.n_latent), ("n_hidden", args.n_hidden)) if k in known and v is not None}


def _trainer(name: str, data, args, device):
    """(model, guide, step(batch), batches on the device) at the registry's settings."""
    import pyro
    import torch

    from pyro_perturb.infer.engine import TrainConfig, make_elbo, training_step
    from pyro_perturb.registry import build, get_entry

    entry = get_entry(name)
    cfg = TrainConfig(**{k: v for k, v in entry.train_defaults.items() if k in TrainConfig.keys()})
    pyro.set_rng_seed(0)
    model, guide, _ = build(name, data.spec, _hparams(name, args), gene_stats=data.gene_stats("train"))
    model.to(device)
    guide.to(device)
    model.train()
    guide.train()
    elbo = make_elbo(cfg.elbo, cfg.num_particles, model.max_plate_nesting)
    batch_size = min(cfg.batch_size, data.n_cells)
    batches = [b.to(device) for b in data.batches("train", batch_size, shuffle=True, seed=0) if b.size == batch_size][:8]
    with torch.no_grad():
        elbo.differentiable_loss(model, guide, batches[0])  # creates lazily built parameters
    optimizer = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=cfg.lr)

    def step(batch):
        return training_step(model, guide, batch, elbo, optimizer, validate_distributions=False)

    return model, guide, step, batches


def throughput(args, device) -> list[dict]:
    data = _replogle_like(args.cells, args.genes, args.singles)
    out = []
    for name in THROUGHPUT_MODELS:
        model, guide, step, batches = _trainer(name, data, args, device)
        for i in range(args.throughput_warmup):
            step(batches[i % len(batches)])
        _sync(device)
        rates = []
        for _ in range(args.throughput_reps):
            t0 = time.perf_counter()
            for i in range(args.throughput_steps):
                loss = step(batches[i % len(batches)])
            _sync(device)
            rates.append(args.throughput_steps * batches[0].size / (time.perf_counter() - t0))
        out.append({"model": name, "batch_size": batches[0].size, "cells_per_s": statistics.median(rates),
                    "rounds": [round(r, 1) for r in rates], "final_loss": float(loss)})
        print(json.dumps(out[-1]), flush=True)
    return out


def ate_at_scale(args, device) -> dict:
    import torch

    from pyro_perturb.evaluate.ate_memory import ate_batch_for_memory, guide_hidden_width, widest_layer
    from pyro_perturb.evaluate.predictive import model_effects

    data = _replogle_like(args.ate_cells, args.genes, args.ate_treatments, seed=1)
    model, guide, step, batches = _trainer("sams_vae", data, args, device)
    t0 = time.perf_counter()
    for i in range(args.ate_train_steps):
        step(batches[i % len(batches)])
    _sync(device)
    spec = data.spec
    labels = list(spec.perturbations)
    G = spec.n_genes
    rows, particles = ate_batch_for_memory(
        args.budget_mb, len(labels) + 1, 100, G, int(model.n_latent), spec.n_perturbations, 1,
        hidden=widest_layer(model, exclude=G), guide_hidden=guide_hidden_width(guide),
    )
    out = {"treatments": len(labels), "particles": args.ate_particles, "genes": G, "budget_mb": args.budget_mb,
           "train_seconds": time.perf_counter() - t0, "treatment_batch_for_budget": rows,
           "particles_per_block_for_budget": particles, "estimators": {}}
    for estimator in ("integrated", "sampled"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        eff = model_effects(model, guide, spec, labels, num_particles=args.ate_particles, estimator=estimator,
                            device=device, memory_mb=args.budget_mb)
        _sync(device)
        entry = {"seconds": time.perf_counter() - t0, "mean_abs_ate": float(abs(eff.ate.to_numpy()).mean())}
        if device.type == "cuda":
            entry["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["estimators"][estimator] = entry
        print(json.dumps({"ate": estimator, **entry}), flush=True)
    return out


def compare_with_cpu(args, device) -> dict:
    import numpy as np
    import pyro
    import torch

    import pyro_perturb as pp
    from pyro_perturb.evaluate.predictive import model_effects
    from pyro_perturb.registry import build

    adata = pp.simulate.combinatorial(seed=1, n_singles=5, n_doubles=3, cells_per_perturbation=20, n_control_cells=60,
                                      n_genes=30, n_ate_draws=10)
    data = pp.PerturbationData.from_anndata(adata)
    pyro.set_rng_seed(0)
    model, guide, _ = build("sams_vae", data.spec, {"n_latent": 4, "n_hidden": 16}, gene_stats=data.gene_stats("train"))
    labels = ["p000", "p001+p002", "p003"]
    pools = {lab: np.random.default_rng(0).lognormal(np.log(150.0), 0.6, 300) for lab in [data.spec.control, *labels]}
    out = {"particles": args.compare_particles, "seeds": args.compare_seeds, "cases": {}}
    passed = True
    for estimator in ("integrated", "sampled"):
        for library_name, library in (("fixed", 1e4), ("observed", pools)):
            means, sds = [], []
            # other seeds on the second side: independent draws also when it is the CPU (dry run)
            for first_seed, dev in ((100, torch.device("cpu")), (200, device)):
                model.to(dev)
                guide.to(dev)
                ates = np.stack([model_effects(model, guide, data.spec, labels, library=library, seed=first_seed + s,
                                               num_particles=args.compare_particles, estimator=estimator,
                                               device=dev).ate.to_numpy() for s in range(args.compare_seeds)])
                means.append(ates.mean(0))
                sds.append(ates.std(0, ddof=1))
            se = np.sqrt((sds[0] ** 2 + sds[1] ** 2) / args.compare_seeds)
            z = (means[1] - means[0]) / np.where(se > 0, se, np.inf)
            case = {"mean_z2": float((z**2).mean()), "max_abs_z": float(np.abs(z).max()),
                    "mean_abs_difference": float(np.abs(means[1] - means[0]).mean())}
            case["pass"] = case["mean_z2"] < 3.0 and case["max_abs_z"] < 8.0
            passed &= case["pass"]
            out["cases"][f"{estimator}, {library_name}"] = case
            print(json.dumps({"compare": f"{estimator}, {library_name}", **case}), flush=True)
    model.to("cpu")
    guide.to("cpu")
    out["pass"] = bool(passed)
    return out


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    lines = ["# GPU check", "", f"Device: {results['device_name']} ({results['device']}); torch {results['torch']}; "
             f"{results['machine']}; sizes: {json.dumps(results['sizes'])}.", ""]
    if "throughput" in results:
        lines += ["## Training throughput (registry settings, engine step)", "", "| model | batch | cells/s |", "|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch_size']} | {r['cells_per_s']:.0f} |" for r in results["throughput"]]
        lines.append("")
    if "ate" in results:
        a = results["ate"]
        lines += [f"## Model ATE: {a['treatments']} treatments x {a['particles']} particles x {a['genes']} genes", "",
                  f"Budget {a['budget_mb']} MB: the memory model takes {a['treatment_batch_for_budget']} request rows x "
                  f"{a['particles_per_block_for_budget']} particles per step.", "",
                  "| estimator | seconds | CUDA max allocated MB | mean abs ATE |", "|---|---|---|---|"]
        for name, e in a["estimators"].items():
            cuda = f"{e['cuda_max_allocated_mb']:.0f}" if "cuda_max_allocated_mb" in e else "-"
            lines.append(f"| {name} | {e['seconds']:.1f} | {cuda} | {e['mean_abs_ate']:.4f} |")
        lines.append("")
    if "compare" in results:
        c = results["compare"]
        lines += [f"## ATE on {results['device']} vs CPU ({c['seeds']} seeds x {c['particles']} particles): "
                  f"{'pass' if c['pass'] else 'FAIL'}", "", "| case | mean z^2 | max abs z | mean abs difference | pass |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['mean_z2']:.2f} | {v['max_abs_z']:.2f} | {v['mean_abs_difference']:.5f} | {v['pass']} |"
                  for k, v in c["cases"].items()]
    (out / "gpu_check").with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(args) -> dict:
    import torch

    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    sizes = {k: getattr(args, k) for k in ("cells", "genes", "singles", "ate_treatments", "ate_particles", "budget_mb",
                                            "compare_particles", "compare_seeds")}
    results = {"device": str(device), "torch": torch.__version__, "machine": f"{platform.machine()}, {args.threads} threads",
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "sizes": sizes}
    out = Path(args.out)
    for part in args.parts:
        t0 = time.perf_counter()
        results[part] = {"throughput": throughput, "ate": ate_at_scale, "compare": compare_with_cpu}[part](args, device)
        results.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
        write_report(results, out)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", nargs="+", default=["compare", "ate", "throughput"], choices=["throughput", "ate", "compare"])
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a dry run (seconds on a CPU)")
    p.add_argument("--threads", type=int, default=4, help="torch CPU threads (the CPU side of compare)")
    p.add_argument("--cells", type=int, default=20_000, help="throughput: cells of the synthetic set")
    p.add_argument("--genes", type=int, default=1187)
    p.add_argument("--singles", type=int, default=200, help="throughput: single perturbations")
    p.add_argument("--throughput-steps", type=int, default=20)
    p.add_argument("--throughput-reps", type=int, default=3)
    p.add_argument("--throughput-warmup", type=int, default=3)
    p.add_argument("--n-latent", type=int, default=None, help="default: the registry's")
    p.add_argument("--n-hidden", type=int, default=None, help="default: the registry's")
    p.add_argument("--ate-treatments", type=int, default=700)
    p.add_argument("--ate-particles", type=int, default=2500)
    p.add_argument("--ate-cells", type=int, default=14_000, help="ate: cells of the training set")
    p.add_argument("--ate-train-steps", type=int, default=50)
    p.add_argument("--budget-mb", type=float, default=1024.0, help="ate: working-memory budget (MB)")
    p.add_argument("--compare-particles", type=int, default=400)
    p.add_argument("--compare-seeds", type=int, default=6)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


if __name__ == "__main__":
    results = main(parse_args())
    sys.exit(0 if results.get("compare", {}).get("pass", True) else 1)
