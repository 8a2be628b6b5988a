"""Smoke tests of examples/sams_vae_perturbseq.py and examples/sams_vae_walkthrough.py."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sams_vae_perturbseq_example_runs_tiny(tmp_path, capsys):
    module = _load("sams_vae_perturbseq")
    args = argparse.Namespace(model="sams_vae", frac=0.5, max_epochs=None, ate_particles=100, seed=0,
                              threads=1, out=str(tmp_path), tiny=True)
    results = module.main(args)
    assert np.isfinite(results["test"]["iwelbo"])
    assert results["ate"]["test"]["ate_n_treatments"] >= 1
    assert 0.0 <= results["targets"]["f1"] <= 1.0
    for name in ("metrics.json", "ate_model.csv", "ate_data.csv", "ate_scatter.png", "mask_heatmap.png"):
        assert (tmp_path / name).exists(), name
    assert "ATE, test treatments" in capsys.readouterr().out


def test_sams_vae_walkthrough_runs():
    module = _load("sams_vae_walkthrough")
    out = module.main(argparse.Namespace(num_steps=20, seed=0))
    assert out["mask"].shape == (3, 2)
    assert np.isfinite(out["r"])
