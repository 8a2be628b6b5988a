"""FCR on cell contexts: train, evaluate counterfactual group means, plot the three blocks.

FCR (Mao et al., NeurIPS 2024) splits each cell's latent state into a covariate block
``z_x`` (cell line / cell type), a treatment block ``z_t`` and an interaction block
``z_tx``, and predicts how a cell context responds to a treatment it was never seen with.

Usage::

    python examples/fcr_cell_context.py --data factorized --out fcr_example
    python examples/fcr_cell_context.py --data kang --heldout "CD14+ Monocytes" --out fcr_kang
    python examples/fcr_cell_context.py --tiny --out /tmp/fcr_smoke      # seconds (smoke test)
    python examples/fcr_cell_context.py --help

What it does:

1. data: the ``factorized`` simulator (held-out (cell line, drug) pairs are the test
   split), or Kang 2018 (IFN-beta PBMCs, ``../shared/data/kang2018_ifnb_pbmc.h5ad``) with the
   stimulated cells of one cell type held out;
2. ``pp.fit(..., model="fcr")`` with the registered defaults;
3. ``run.evaluate`` -> ``metrics.json``, ``group_means_model.csv``, ``group_means_data.csv``
   (held-out group R^2 on all genes and on the top 20 DE genes, block clustering, dHSIC);
4. a counterfactual from Python: ``predict_counterfactual(run, covariates, treatment)``;
5. ``blocks.png``: a 2-D PCA of each block, coloured by covariate and by treatment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

KANG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kang2018_ifnb_pbmc.h5ad"


def kang_split(adata, heldout: str, seed: int = 0, val_fraction: float = 0.2):
    """Copy of the Kang data whose ``obs["split"]`` holds out the stimulated cells of one
    cell type (test) and splits the rest train / val at random."""
    from pyro_perturb.data.splits import _as_categorical

    adata = adata.copy()
    rng = np.random.default_rng(seed)
    split = np.where(rng.random(adata.n_obs) < val_fraction, "val", "train").astype(object)
    test = (adata.obs["cluster_id"].astype(str) == heldout) & (adata.obs["group_id"].astype(str) == "stim")
    split[test.to_numpy()] = "test"
    adata.obs["split"] = _as_categorical(split)
    return adata


def load(args):
    import pyro_perturb as pp

    if args.data == "factorized":
        sizes = dict(cells_per_group=40, n_genes=60, n_covariates=3, n_treatments=3, n_heldout_pairs=1, hidden=16) if args.tiny else {}
        adata = pp.simulate.factorized(seed=args.seed, **sizes)
        return adata, {"covariate_keys": ["cell_line"]}, "cell_line"
    import anndata

    if not KANG.exists():
        raise SystemExit(f"{KANG} not found")
    adata = kang_split(anndata.read_h5ad(KANG), args.heldout, seed=args.seed)
    return adata, {"perturbation_key": "group_id", "control": "ctrl", "covariate_keys": ["cluster_id"]}, "cluster_id"


def plot_blocks(adata_pred, cov_key: str, trt_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    blocks = [("X_zx", "z_x (covariate)"), ("X_zt", "z_t (treatment)"), ("X_ztx", "z_tx (interaction)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for j, (key, title) in enumerate(blocks):
        xy = PCA(2, random_state=0).fit_transform(adata_pred.obsm[key])
        for i, col in enumerate([cov_key, trt_key]):
            ax = axes[i, j]
            labels = adata_pred.obs[col].astype(str).to_numpy()
            for lab in np.unique(labels):
                m = labels == lab
                ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6, label=lab)
            ax.set_title(f"{title}, coloured by {col}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 2:
                ax.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> dict:
    import torch

    torch.set_num_threads(1)
    import pyro_perturb as pp
    from pyro_perturb.evaluate import write_metrics
    from pyro_perturb.evaluate.groups import predict_counterfactual

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata, options, cov_key = load(args)
    settings = dict(max_epochs=5, n_hidden=32, batch_size=128) if args.tiny else {}
    run = pp.fit(adata, model="fcr", out=out / "run", seed=args.seed, device="cpu", **options, **settings)

    results = run.evaluate(run.data, num_particles=5 if args.tiny else 100, out_dir=out)
    write_metrics(results, out / "metrics.json")
    test = results["test"]
    print(
        f"held-out groups: {test.get('n_groups')}, R^2 all genes {test.get('group_r2'):.3f} "
        f"(baseline {test.get('group_r2_baseline', float('nan')):.3f}), top-20 DE "
        f"{test.get('group_r2_top20'):.3f} (baseline {test.get('group_r2_top20_baseline', float('nan')):.3f})"
    )

    # a counterfactual from Python: the first held-out group
    group = next(iter(test.get("groups", {})), None)
    if group is not None:
        cov, treatment = group.rsplit("|", 1)
        draws = predict_counterfactual(run, cov, treatment, n_cells=200, data=run.data, seed=args.seed)
        print(f"counterfactual {group}: {draws.shape[0]} cells, mean log-expression {draws.mean():.3f}")

    trt_key = options.get("perturbation_key", "perturbation")
    plot_blocks(run.predict(adata), cov_key, trt_key, out / "blocks.png")
    print(f"wrote {out / 'metrics.json'}, group means CSVs and {out / 'blocks.png'}")
    return json.loads((out / "metrics.json").read_text())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="FCR on cell contexts: train, evaluate counterfactual group means, plot the three blocks"
    )
    parser.add_argument("--data", choices=["factorized", "kang"], default="factorized",
                        help="the factorized simulator, or Kang 2018 from ../shared/data")
    parser.add_argument("--heldout", default="CD14+ Monocytes", help="Kang: cell type whose stimulated cells are held out")
    parser.add_argument("--out", default="fcr_example", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny settings (smoke test)")
    args = parser.parse_args()
    main(args)
