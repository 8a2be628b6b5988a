"""Smoke test of examples/svae_simulation.py with tiny settings."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "svae_simulation.py"


def test_svae_simulation_example_runs_tiny(capsys):
    spec = importlib.util.spec_from_file_location("svae_simulation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(argparse.Namespace(models=["svae_plus", "vae"], seed=0, tiny=True))
    assert [r["model"] for r in rows] == ["svae_plus", "vae"]
    for r in rows:
        assert 0.0 <= r["mcc_pearson"] <= 1.0 and 0.0 <= r["target_f1"] <= 1.0
        assert np.isfinite(r["transfer_iwelbo"])
    assert "held-out IWELBO" in capsys.readouterr().out
