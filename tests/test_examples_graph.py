"""Smoke test of examples/causal_graph.py with tiny settings (both graph models)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "causal_graph.py"


@pytest.mark.parametrize("model", ["dcdfg", "nodags"])
def test_causal_graph_example_runs_tiny(model, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("causal_graph", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(model=model, data=None, heldout=None, n_genes=8, max_epochs=None, top=5,
                              out=str(tmp_path), seed=0, tiny=True)
    result = module.main(args)
    edges = pd.read_csv(tmp_path / "edges.csv")
    assert list(edges.columns) == ["source", "target", "weight"] and len(edges) <= 5
    assert 0 <= result["auprc"] <= 1 and result["shd"] >= 0
    assert np.isfinite(result["test_inll_model"]) and np.isfinite(result["test_inll_no_edge"])
    assert "no-edge baseline" in capsys.readouterr().out
