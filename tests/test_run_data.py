"""A run's data source: recorded by ``fit`` in config.json, and ``Run.load_data`` /
``Run.data`` rebuilding the training data for fitted and loaded runs alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pyro_perturb as pp
from pyro_perturb.data.anndata import BackedCSRRows

SMALL = dict(n_latent=2, n_hidden=8, batch_size=64, max_epochs=1, progress=False, device="cpu")


def _same_data(a, b) -> None:
    assert a.n_cells == b.n_cells and a.spec.genes == b.spec.genes
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.indices(split), b.indices(split))
    idx = np.arange(0, a.n_cells, 7)
    np.testing.assert_array_equal(a.read_counts(idx), b.read_counts(idx))


def test_file_source_is_saved_and_rebuilds_the_data(tiny_adata, tmp_path):
    path = tmp_path / "d.h5ad"
    tiny_adata.write_h5ad(path)
    run = pp.fit(str(path), model="cvae", out=tmp_path / "run", **SMALL)
    assert run.data_source == {"path": str(path.resolve()), "backed": False}
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data_source"] == run.data_source and "source" not in cfg["data"]
    loaded = pp.load_run(tmp_path / "run")
    assert loaded.data_source == run.data_source
    _same_data(loaded.data, run.data)
    assert loaded.data is loaded.data  # rebuilt once
    backed = loaded.load_data(backed=True)
    assert isinstance(backed.counts, BackedCSRRows)
    _same_data(backed, run.data)


def test_builtin_source_is_saved_and_rebuilds_the_data(tmp_path, monkeypatch):
    from pyro_perturb.data import simulate

    real = simulate.combinatorial

    def small(seed=0, **sizes):  # the built-in data at a test's size
        return real(seed=seed, **{**dict(n_singles=4, n_doubles=2, cells_per_perturbation=30, n_control_cells=60,
                                         n_genes=30, n_ate_draws=10), **sizes})

    monkeypatch.setattr(simulate, "combinatorial", small)
    run = pp.fit(model="cvae", out=tmp_path / "run", data_seed=2, **SMALL)
    assert run.data_source == {"builtin": "combinatorial", "seed": 2, "sizes": {}}
    _same_data(pp.load_run(tmp_path / "run").load_data(), run.data)


def test_in_memory_data_has_no_source(tiny_adata, tmp_path):
    run = pp.fit(tiny_adata, model="cvae", out=tmp_path / "run", **SMALL)
    assert run.data_source == {} and run.data.n_cells == tiny_adata.n_obs
    with pytest.raises(ValueError, match="in-memory data"):
        pp.load_run(tmp_path / "run").data
