"""Out-of-core training: backed reads never load the matrix, block-shuffled orders,
data-parallel shards of batches, and mid-epoch checkpoints that resume exactly."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_perturb.cli import main
from pyro_perturb.data import PerturbationData, epoch_order
from pyro_perturb.data.anndata import BackedCSRRows
from pyro_perturb.infer import engine
from pyro_perturb.infer.engine import TrainConfig
from pyro_perturb.run import fit


def _adata(n_cells=600, n_genes=15, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, (n_cells, n_genes)).astype(np.float32)
    X[:, 0] += 1
    obs = pd.DataFrame(
        {"perturbation": rng.choice(["control", "A", "B", "A+B"], n_cells)}, index=[f"c{i}" for i in range(n_cells)]
    )
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{g}" for g in range(n_genes)]))


@pytest.fixture()
def h5ad_path(tmp_path):
    path = tmp_path / "d.h5ad"
    _adata().write_h5ad(path)
    return path


def test_epoch_order_blocks_cover_every_cell_and_stay_local():
    np.testing.assert_array_equal(epoch_order(50, 3), np.random.default_rng(3).permutation(50))  # unchanged default
    order = epoch_order(1003, 7, block_size=10, buffer_blocks=4)
    np.testing.assert_array_equal(np.sort(order), np.arange(1003))
    np.testing.assert_array_equal(order, epoch_order(1003, 7, block_size=10, buffer_blocks=4))
    order = epoch_order(1000, 7, block_size=10, buffer_blocks=4)
    for start in range(0, 1000, 40):  # a window of 4 blocks holds cells of 4 blocks only
        assert len(set(order[start : start + 40] // 10)) == 4
    assert len(set(order[:10] // 10)) > 1  # and is shuffled within
    assert not np.array_equal(order, epoch_order(1003, 8, block_size=10, buffer_blocks=4))
    with pytest.raises(ValueError, match="block_size"):
        epoch_order(10, 0, block_size=-1)


def test_backed_training_never_loads_the_matrix(h5ad_path, monkeypatch):
    """Encoding, gene statistics and minibatches of a backed file read row slices only,
    and give exactly the in-memory numbers."""
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset

    def refuse(self, *args, **kwargs):
        raise AssertionError("the whole backed matrix was loaded")

    memory = PerturbationData.from_anndata(ad.read_h5ad(h5ad_path))
    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", refuse)
    backed = PerturbationData.from_anndata(ad.read_h5ad(h5ad_path, backed="r"))
    assert isinstance(backed.counts, BackedCSRRows)
    np.testing.assert_array_equal(backed.library, memory.library)
    for a, b in zip(backed.gene_stats("train"), memory.gene_stats("train")):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for block_size in (None, 8):
        pairs = zip(
            backed.batches("train", 32, shuffle=True, seed=1, block_size=block_size, buffer_blocks=3),
            memory.batches("train", 32, shuffle=True, seed=1, block_size=block_size, buffer_blocks=3),
        )
        for b, m in pairs:
            torch.testing.assert_close(b.x, m.x)
            torch.testing.assert_close(b.index, m.index)
            assert b.n_cells == m.n_cells == len(memory.indices("train"))
    idx = np.array([599, 0, 300, 301, 17])
    np.testing.assert_array_equal(backed.read_counts(idx), memory.read_counts(idx))


def test_shards_split_every_batch_between_ranks():
    data = PerturbationData.from_anndata(_adata(n_cells=203))
    n_train = len(data.indices("train"))
    whole = list(data.batches("train", 8, shuffle=True, seed=2))
    shards = [list(data.batches("train", 8, shuffle=True, seed=2, shard=(r, 2))) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    for full, a, b in zip(whole, *shards):
        assert a.size == b.size == full.size // 2 and a.n_cells == n_train  # plate: the whole split
        assert not set(a.index.tolist()) & set(b.index.tolist())
        if full.size % 2 == 0:
            assert sorted(a.index.tolist() + b.index.tolist()) == sorted(full.index.tolist())
    # start_step skips batches without changing the rest
    later = list(data.batches("train", 8, shuffle=True, seed=2, start_step=3))
    assert [b.index.tolist() for b in later] == [b.index.tolist() for b in whole[3:]]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        next(data.batches("train", 9, shard=(0, 2)))
    with pytest.raises(ValueError, match="rank"):
        next(data.batches("train", 8, shard=(2, 2)))


@pytest.mark.parametrize(
    "bad", [{"shuffle_block_size": 0}, {"shuffle_buffer_blocks": 0}, {"checkpoint_every_steps": 0}]
)
def test_train_config_refuses_bad_loader_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_mid_epoch_checkpoint_resumes_at_its_step_and_matches_uninterrupted(h5ad_path, tmp_path, monkeypatch):
    """A backed, block-shuffled run interrupted mid-epoch resumes from its step-level
    checkpoint without redoing steps, and ends as the uninterrupted run."""
    settings = dict(
        max_epochs=2, batch_size=16, seed=5, n_latent=2, n_hidden=8, device="cpu", early_stopping_patience=None,
        shuffle_block_size=8, shuffle_buffer_blocks=4, checkpoint_every_steps=5,
    )
    steps_per_epoch = -(-len(PerturbationData.from_anndata(ad.read_h5ad(h5ad_path)).indices("train")) // 16)
    full = fit(str(h5ad_path), "cvae", out=tmp_path / "full", backed=True, **settings)

    calls = {"n": 0}
    real_step = engine.training_step

    def interrupt_at_step_38(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 38:  # inside epoch 2 (steps_per_epoch < 38): after its 2nd checkpoint
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "training_step", interrupt_at_step_38)
    with pytest.raises(KeyboardInterrupt):
        fit(str(h5ad_path), "cvae", out=tmp_path / "cut", backed=True, **settings)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    done_in_epoch = (37 - steps_per_epoch) // 5 * 5
    assert (ckpt["epoch"], ckpt["step"]) == (1, done_in_epoch) and done_in_epoch > 0

    calls["n"] = 0
    resumed = fit(out=tmp_path / "cut", model="cvae", resume=True)  # data, backed: from the saved run
    assert calls["n"] == 2 * steps_per_epoch - (steps_per_epoch + done_in_epoch)  # no step redone
    assert resumed.data.counts.__class__ is BackedCSRRows
    a = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    for part in ("model", "guide"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert [r["train_loss"] for r in resumed.history] == pytest.approx([r["train_loss"] for r in full.history], rel=1e-12)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]


def test_cli_backed_needs_a_data_file(tmp_path, capsys):
    assert main(["fit", "--model", "cvae", "--out", str(tmp_path / "r"), "--backed", "--quiet"]) == 2
    assert "--backed needs --data" in capsys.readouterr().err
