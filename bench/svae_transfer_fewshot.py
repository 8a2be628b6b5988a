"""Few-shot OOD transfer in the sVAE family: held-out IWELBO against the number of cells
per held-out perturbation used to fit its shift (and mask).

The main benchmark (``svae_benchmark.py``) fits the held-out perturbations on 125 cells
each; with that much data a dense shift (iVAE) is estimated as well as a sparse one, and
the sparse models' advantage can only come from a better encoder/decoder. This script
trains each model once (``sparse_shift(seed)``, registry defaults plus ``--set``), saves the
run under ``OUT/fewshot/MODEL_seedS``, then transfers with 5, 25 and 125 fit cells per
held-out perturbation, always scored on the same eval cells (the other half).

    python bench/svae_transfer_fewshot.py --models svae_plus ivae vae --seed 0 --set max_epochs=30
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from svae_benchmark import _parse_sets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["svae_plus", "svae", "ivae", "vae"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--cells", nargs="+", type=int, default=[5, 25, 125])
    p.add_argument("--num-particles", type=int, default=100)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from pyro_perturb.data import simulate
    from pyro_perturb.infer.transfer import transfer_run
    from pyro_perturb.run import fit, load_run

    settings = _parse_sets(args.set)
    adata = simulate.sparse_shift(seed=args.seed)
    out = Path(args.out) / "fewshot"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        run_dir = out / f"{model}_seed{args.seed}"
        if not (run_dir / "model.pt").exists():
            fit(adata, model=model, seed=args.seed, out=run_dir, **settings)
        for n in args.cells:
            run = load_run(run_dir)  # a fresh copy: transfer modifies the held-out rows
            t0 = time.perf_counter()
            r = transfer_run(run, adata, seed=args.seed, fit_cells_per_label=n, num_particles=args.num_particles)
            r.update(fit_cells_per_label=n, seconds=time.perf_counter() - t0, seed=args.seed)
            rows.append(r)
            print(f"{model} {n:4d} cells/label: held-out IWELBO {r['transfer_iwelbo']:.2f} "
                  f"(ELBO {r['transfer_elbo']:.2f}; before {r['before_iwelbo']:.2f})", flush=True)
    (out / f"fewshot_seed{args.seed}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
