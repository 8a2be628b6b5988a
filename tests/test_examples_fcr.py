"""Smoke test of examples/fcr_cell_context.py (tiny settings)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fcr_cell_context.py"


def test_fcr_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("fcr_cell_context", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(data="factorized", heldout="CD14+ Monocytes", out=str(tmp_path), seed=0, tiny=True)
    metrics = module.main(args)
    assert "group_r2" in metrics["test"]
    for name in ("metrics.json", "group_means_model.csv", "group_means_data.csv", "blocks.png"):
        assert (tmp_path / name).exists(), name
