"""Shared fixtures: small seeded datasets, and the default-device check (docs/architecture.md, "Devices")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_clear():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def tiny_adata():
    """A small combinatorial simulation: 6 singles, 4 doubles, 50 genes (~500 cells)."""
    from pyro_perturb.data import simulate

    return simulate.combinatorial(
        seed=0, n_singles=6, n_doubles=4, cells_per_perturbation=40, n_control_cells=100, n_genes=50
    )


@pytest.fixture()
def tiny_data(tiny_adata):
    from pyro_perturb.data import PerturbationData

    return PerturbationData.from_anndata(tiny_adata)


def shared_data(name: str) -> Path:
    """Path of a dataset in ../shared/data; skips the test when the folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path
