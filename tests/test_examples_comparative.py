"""Smoke test of examples/comparative_perturbseq.py (tiny settings)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import anndata as ad

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "comparative_perturbseq.py"


def test_comparative_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("comparative_perturbseq", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(data="comparative", model="mo_cvae", n_background=3, n_salient=2, max_epochs=3,
                              papalexi="", out=str(tmp_path), seed=0, tiny=True)
    metrics = module.main(args)
    assert {"background_mcc", "salient_mcc", "leakage_background", "leakage_salient"} <= set(metrics)
    assert (tmp_path / "metrics.json").exists()
    latents = ad.read_h5ad(tmp_path / "latents.h5ad")
    assert latents.obsm["X_background"].shape[1] == 3 and latents.obsm["X_salient"].shape[1] == 2
