"""One rank of the data-parallel training test (``tests/test_distributed.py``).

Run by ``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT``
(or alone, without a process group, for the single-process reference). Trains

* a small model whose guide is deterministic (a Delta posterior from an encoder), so
  the loss has no particle noise and data-parallel training must reproduce the
  single-process numbers, and
* the zoo's ``cvae`` (stochastic guide) with a run directory,

and saves each rank's final parameters, history and run-directory listing to
``OUT/rank{RANK}_{world}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import scipy.sparse as sp
import torch
from pyro.nn import PyroModule

from pyro_perturb.data import PerturbationData
from pyro_perturb.infer import distributed
from pyro_perturb.infer.engine import TrainConfig, train
from pyro_perturb.registry import build

N_GENES, N_LATENT = 12, 3


class DeterministicModel(PyroModule):
    """z_i ~ N(0, I); x_i ~ Poisson(library_i * softmax(W z_i + b))."""

    max_plate_nesting = 1

    def __init__(self) -> None:
        super().__init__()
        self.decoder = torch.nn.Linear(N_LATENT, N_GENES)

    def forward(self, batch):
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = pyro.sample("z", dist.Normal(torch.zeros(N_LATENT), 1.0).to_event(1))
            rate = batch.library[:, None] * torch.softmax(self.decoder(z), -1)
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=batch.x)


class DeterministicGuide(PyroModule):
    """z_i = encoder(log1p x_i) exactly (a Delta posterior: no sampling noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(N_GENES, N_LATENT)

    def forward(self, batch):
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            pyro.sample("z", dist.Delta(self.encoder(torch.log1p(batch.x)), event_dim=1))


def toy_data(covariate_keys: tuple[str, ...] = ()) -> PerturbationData:
    """160 training and 40 validation cells, Poisson counts, three labels."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(2.0, 2.0, (200, N_GENES))).astype(np.float32) + 1
    obs = pd.DataFrame(
        {
            "perturbation": rng.choice(["control", "A", "B"], 200),
            "split": ["train"] * 160 + ["val"] * 40,
        },
        index=[f"c{i}" for i in range(200)],
    )
    obs["cell_line"] = rng.choice(["L1", "L2"], 200)  # drawn last: the columns above are unchanged
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{g}" for g in range(N_GENES)]))
    return PerturbationData.from_anndata(adata, covariate_keys=covariate_keys)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init_from_env("cpu")
    data = toy_data()
    cfg = dict(batch_size=32, lr=0.05, device="cpu", seed=3, early_stopping_patience=None)

    # record the cells of every batch read (training and validation), in order
    cells_read, read_batch = [], data.batch

    def recording_batch(idx, *args, **kwargs):
        cells_read.append(sorted(int(i) for i in idx))
        return read_batch(idx, *args, **kwargs)

    data.batch = recording_batch
    torch.manual_seed(0)
    model, guide = DeterministicModel(), DeterministicGuide()
    history = train(model, guide, data, TrainConfig(max_epochs=3, **cfg))
    data.batch = read_batch
    result = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "toy_cells_read": cells_read,
        "toy_params": {k: v.detach().clone() for k, v in {**model.state_dict(), **guide.state_dict()}.items()},
        "toy_history": history,
    }

    torch.manual_seed(0)
    model, guide, _ = build("cvae", data.spec, {"n_latent": 2, "n_hidden": 8}, gene_stats=data.gene_stats())
    run_dir = out / f"cvae_run_{ctx.world_size}"
    history = train(model, guide, data, TrainConfig(max_epochs=2, checkpoint_every_steps=2, **cfg), run_dir=run_dir)
    distributed.barrier(ctx)
    result["cvae_params"] = {k: v.detach().clone() for k, v in {**model.state_dict(), **guide.state_dict()}.items()}
    result["cvae_history"] = history
    result["run_dir_files"] = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []

    # a model with an adversary (FCR: its discriminator has its own optimiser)
    fcr_data = toy_data(covariate_keys=("cell_line",))
    torch.manual_seed(0)
    model, guide, _ = build("fcr", fcr_data.spec, {"n_hidden": 8}, gene_stats=fcr_data.gene_stats())
    adversary_init = {k: v.detach().clone() for k, v in model.adversary.state_dict().items()}
    train(model, guide, fcr_data, TrainConfig(max_epochs=1, **cfg))
    result["fcr_adversary_init"] = adversary_init
    result["fcr_params"] = {k: v.detach().clone() for k, v in {**model.state_dict(), **guide.state_dict()}.items()}
    result["fcr_adversary_keys"] = sorted(k for k in model.state_dict() if k.startswith("adversary."))
    torch.save(result, out / f"rank{ctx.rank}_{ctx.world_size}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
