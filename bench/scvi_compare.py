"""The zoo's scVI beside scvi-tools' SCVI on Kang 2018, at matched settings.

Both fit the same cells with the same train / validation / test split (seeded, 64/16/20),
n_latent 10, n_hidden 128, one hidden layer, dropout 0.1, a negative binomial with
gene-wise dispersion at the observed library size, the donor as the batch (one-hot into
encoder and decoder), Adam at lr 1e-3 (weight decay 1e-6), batch 128, the same number of
epochs, no KL warm-up, each evaluated at the state of its best validation ELBO (the zoo's
engine keeps it; scvi-tools through a ``SaveCheckpoint`` callback; ``--keep last``: the
final state). Each side reports, on the held-out (test) cells, the ELBO per cell
and the marginal log-likelihood per cell (importance sampling with the encoder, 100
samples: scvi-tools' ``get_marginal_ll``, the zoo's IWELBO), and, on the posterior means
of every cell, kNN batch entropy (how well the donors mix, 1 = perfectly) and the
adjusted Rand index of k-means (k = 5) against the five annotated cell types. The latent
metrics are computed by the same function on both sides (:func:`latent_metrics`).

The two sides run in two Python environments (scvi-tools is not a dependency of the zoo)
and write one JSON per (side, seed); ``--side report`` joins them into a table::

    python bench/scvi_compare.py --side ours --seeds 0 1 2
    /path/to/scvi_venv/bin/python bench/scvi_compare.py --side scvi-tools --seeds 0 1 2
    python bench/scvi_compare.py --side report

``--side ours`` also scores a latent-free reference: PCA (10 components) of
log1p-normalised expression (``pca``). ``--variant paper`` fits both sides as in the scVI
paper instead: a zero-inflated NB and a latent library with the per-batch log-normal prior
(their marginal log-likelihoods then include the library, so they compare with each other,
not with the default rows). ``--quick`` trains 20 epochs (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KANG = ROOT.parent / "shared" / "data" / "kang2018_ifnb_pbmc.h5ad"
DEFAULT_OUT = ROOT / "bench" / "results" / "scvi_compare"
SIDES = ("ours", "scvi-tools")
BATCH_KEY = "donor"
CELL_TYPE_KEY = "cluster_id"
N_LATENT, N_HIDDEN, N_LAYERS, DROPOUT, LR, BATCH_SIZE, WEIGHT_DECAY = 10, 128, 1, 0.1, 1e-3, 128, 1e-6
MARGINAL_SAMPLES = 100
KNN = 30


def load_kang(path: Path, seed: int, max_cells: int | None = None, n_genes: int | None = None):
    """Kang 2018 as an AnnData with dense float32 counts, ``obs["donor"]`` (from
    ``sample_id``) and a seeded 64/16/20 ``obs["split"]``; optionally subsampled to
    ``max_cells`` cells and the ``n_genes`` genes of highest log1p-normalised variance."""
    import anndata as ad
    import pandas as pd

    adata = ad.read_h5ad(path)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    adata = ad.AnnData(x.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    rng = np.random.default_rng(seed)
    if max_cells is not None and adata.n_obs > max_cells:
        adata = adata[np.sort(rng.choice(adata.n_obs, max_cells, replace=False))].copy()
    if n_genes is not None and adata.n_vars > n_genes:
        lognorm = np.log1p(1e4 * adata.X / adata.X.sum(1, keepdims=True))
        adata = adata[:, np.sort(np.argsort(-lognorm.var(0))[:n_genes])].copy()
    adata = adata[adata.X.sum(1) > 0].copy()
    adata.obs[BATCH_KEY] = pd.Categorical(adata.obs["sample_id"].astype(str).str[-3:])
    u = rng.random(adata.n_obs)
    adata.obs["split"] = pd.Categorical(np.where(u < 0.64, "train", np.where(u < 0.80, "val", "test")))
    adata.obs["perturbation"] = pd.Categorical(["control"] * adata.n_obs)
    return adata


def latent_metrics(latent: np.ndarray, batches: np.ndarray, cell_types: np.ndarray, seed: int = 0) -> dict:
    """kNN batch entropy (k = :data:`KNN`, normalised by log(#batches), mean over cells),
    k-means ARI and NMI against the cell types (k = #types, 20 restarts)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.neighbors import NearestNeighbors

    batches, cell_types = np.asarray(batches).astype(str), np.asarray(cell_types).astype(str)
    _, batch_codes = np.unique(batches, return_inverse=True)
    n_batches = batch_codes.max() + 1
    neighbours = NearestNeighbors(n_neighbors=KNN + 1).fit(latent).kneighbors(latent, return_distance=False)[:, 1:]
    freq = np.stack([(batch_codes[neighbours] == b).mean(1) for b in range(n_batches)], axis=1)
    entropy = -(freq * np.log(np.where(freq > 0, freq, 1.0))).sum(1) / np.log(n_batches)
    labels = KMeans(n_clusters=len(np.unique(cell_types)), n_init=20, random_state=seed).fit_predict(latent)
    return {
        "batch_entropy": float(entropy.mean()),
        "ari_kmeans": float(adjusted_rand_score(cell_types, labels)),
        "nmi_kmeans": float(normalized_mutual_info_score(cell_types, labels)),
    }


def _write(out: Path, name: str, record: dict) -> None:
    (out / "runs").mkdir(parents=True, exist_ok=True)
    path = out / "runs" / f"{name}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))


def run_ours(adata, seed: int, epochs: int, out: Path, data_args: dict, variant: str = "default") -> None:
    import torch

    import pyro_perturb as pp

    torch.set_num_threads(1)
    data = pp.PerturbationData.from_anndata(adata, covariate_keys=[BATCH_KEY], seed=seed)
    paper = {"likelihood": "zinb", "library": "latent"} if variant == "paper" else {}
    start = time.perf_counter()
    run = pp.fit(data, model="scvi", out=None, max_epochs=epochs, early_stopping_patience=None, seed=seed,
                 progress=False, device="cpu", n_latent=N_LATENT, n_hidden=N_HIDDEN, n_layers=N_LAYERS, **paper,
                 dropout_rate=DROPOUT, lr=LR, batch_size=BATCH_SIZE, weight_decay=WEIGHT_DECAY, kl_warmup_epochs=0)
    seconds = time.perf_counter() - start
    elbo = np.mean([run.iwelbo(data, "test", num_particles=1, seed=rep).mean() for rep in range(5)])
    marginal = run.iwelbo(data, "test", num_particles=MARGINAL_SAMPLES, seed=seed).mean()
    latent = run.latents(data)["X_latent"]
    # the engine keeps the state of the best validation loss (scvi-tools keeps the last)
    val = [r.get("val_loss", np.nan) for r in run.history]
    best = int(np.nanargmin(val))
    side = "ours" if variant == "default" else f"ours-{variant}"
    record = {"side": side, "seed": seed, "epochs": epochs, "train_seconds": seconds,
              "best_epoch": int(run.history[best]["epoch"]), "best_val_loss": float(val[best]),
              "last_val_loss": float(val[-1]),
              "test_elbo": float(elbo), "test_marginal_ll": float(marginal),
              **latent_metrics(latent, adata.obs[BATCH_KEY], adata.obs[CELL_TYPE_KEY], seed), **data_args}
    _write(out, f"{side}_seed{seed}", record)
    if variant != "default":
        return
    # latent-free reference: PCA of log1p-normalised expression
    from sklearn.decomposition import PCA

    lognorm = np.log1p(1e4 * adata.X / adata.X.sum(1, keepdims=True))
    pcs = PCA(n_components=N_LATENT, random_state=seed).fit_transform(lognorm)
    _write(out, f"pca_seed{seed}", {"side": "pca", "seed": seed, **latent_metrics(pcs, adata.obs[BATCH_KEY],
                                                                                    adata.obs[CELL_TYPE_KEY], seed),
                                    **data_args})


def run_scvi_tools(adata, seed: int, epochs: int, out: Path, data_args: dict, variant: str = "default",
                   keep: str = "best") -> None:
    import tempfile

    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = seed
    split = adata.obs["split"].astype(str).to_numpy()
    indexing = [np.flatnonzero(split == s) for s in ("train", "val", "test")]
    scvi.model.SCVI.setup_anndata(adata, batch_key=BATCH_KEY)
    model = scvi.model.SCVI(adata, n_latent=N_LATENT, n_hidden=N_HIDDEN, n_layers=N_LAYERS, dropout_rate=DROPOUT,
                            gene_likelihood="zinb" if variant == "paper" else "nb", dispersion="gene",
                            use_observed_lib_size=variant != "paper", encode_covariates=True)
    # keep="best": the state of the best validation ELBO, as the zoo's engine keeps; "last": the final one
    callbacks, checkpoints = [], tempfile.TemporaryDirectory()
    if keep == "best":
        callbacks.append(scvi.train.SaveCheckpoint(dirpath=checkpoints.name, monitor="elbo_validation",
                                                   load_best_on_end=True))
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=BATCH_SIZE, accelerator="cpu", early_stopping=False,
                datasplitter_kwargs={"external_indexing": indexing}, enable_progress_bar=False,
                plan_kwargs={"lr": LR, "weight_decay": WEIGHT_DECAY, "n_epochs_kl_warmup": None},
                check_val_every_n_epoch=1, callbacks=callbacks)
    seconds = time.perf_counter() - start
    checkpoints.cleanup()
    model.module.eval()
    test = indexing[2]
    elbo = float(np.mean([model.get_elbo(indices=test, return_mean=False).mean().item() for _ in range(5)]))
    marginal = float(model.get_marginal_ll(indices=test, n_mc_samples=MARGINAL_SAMPLES, return_mean=False).mean())
    latent = model.get_latent_representation()
    side = ("scvi-tools" if variant == "default" else f"scvi-tools-{variant}") + ("-last" if keep == "last" else "")
    record = {"side": side, "version": scvi.__version__, "seed": seed, "epochs": epochs,
              "train_seconds": seconds, "test_elbo": elbo, "test_marginal_ll": marginal,
              **latent_metrics(latent, adata.obs[BATCH_KEY], adata.obs[CELL_TYPE_KEY], seed), **data_args}
    _write(out, f"{side}_seed{seed}", record)


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def report(out: Path) -> str:
    """The table of every run JSON under ``out/runs`` (mean ± sd over seeds), as Markdown."""
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    rows = ["| method | seeds | test ELBO / cell | test marginal LL / cell | kNN batch entropy | k-means ARI | k-means NMI | train s |",
            "|---|---|---|---|---|---|---|---|"]
    for side in ("ours", "scvi-tools", "scvi-tools-last", "pca", "ours-paper", "scvi-tools-paper"):
        recs = [r for r in records if r["side"] == side]
        if not recs:
            continue
        cols = [_mean_sd([r.get(k) for r in recs]) for k in
                ("test_elbo", "test_marginal_ll", "batch_entropy", "ari_kmeans", "nmi_kmeans", "train_seconds")]
        name = {"ours": "pyro-perturb `scvi`", "scvi-tools": f"scvi-tools SCVI {recs[0].get('version', '')}",
                "pca": "PCA (10) of log1p-normalised",
                "scvi-tools-last": f"scvi-tools SCVI {recs[0].get('version', '')}, last epoch's state",
                "ours-paper": "pyro-perturb `scvi`, ZINB + latent library",
                "scvi-tools-paper": f"scvi-tools SCVI {recs[0].get('version', '')}, ZINB + latent library"}[side]
        rows.append(f"| {name} | {', '.join(str(r['seed']) for r in recs)} | " + " | ".join(cols) + " |")
    metrics = ("test_elbo", "test_marginal_ll", "batch_entropy", "ari_kmeans", "nmi_kmeans")
    for ours, theirs in (("ours", "scvi-tools"), ("ours-paper", "scvi-tools-paper")):
        paired = []
        for seed in sorted({r["seed"] for r in records}):
            by_side = {r["side"]: r for r in records if r["seed"] == seed}
            if ours in by_side and theirs in by_side:
                paired.append({k: by_side[ours][k] - by_side[theirs][k] for k in metrics})
        if paired:
            cols = [_mean_sd([p[k] for p in paired]) for k in metrics]
            rows.append(f"| {ours} - {theirs}, paired by seed | {len(paired)} | " + " | ".join(cols) + " | |")
    table = "\n".join(rows)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return table


def main(args) -> None:
    out = Path(args.out)
    if args.side == "report":
        report(out)
        return
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data} is missing (Kang 2018, see the shared data folder)")
    epochs = 20 if args.quick else args.epochs
    for seed in args.seeds:
        adata = load_kang(Path(args.data), seed, args.max_cells, args.n_genes)
        data_args = {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "machine": platform.machine(),
                     "date": time.strftime("%Y-%m-%d")}
        if args.side == "ours":
            run_ours(adata, seed, epochs, out, data_args, args.variant)
        else:
            run_scvi_tools(adata, seed, epochs, out, data_args, args.variant, args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=[*SIDES, "report"], required=True,
                   help="which model to fit (each in its own environment), or join the JSON files")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=400, help="training epochs of both sides (scvi-tools' default "
                                                          "for a data set this small)")
    p.add_argument("--quick", action="store_true", help="20 epochs (a smoke run)")
    p.add_argument("--variant", choices=["default", "paper"], default="default",
                   help="paper: ZINB and a latent library on both sides (default: NB at the observed library)")
    p.add_argument("--keep", choices=["best", "last"], default="best",
                   help="scvi-tools: evaluate the state of the best validation ELBO (default, as the zoo's "
                        "engine does) or of the last epoch")
    p.add_argument("--max-cells", type=int, default=None, help="subsample cells (Kang has 1,556)")
    p.add_argument("--n-genes", type=int, default=None, help="keep the top-variance genes (Kang has 1,267)")
    p.add_argument("--data", default=str(KANG))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
