"""Smoke test of examples/differential_expression.py (tiny settings) and its --help."""

from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "differential_expression.py"


def test_differential_expression_example_runs_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("differential_expression", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(model="cvae", perturbation="p001", delta=0.25, fdr=0.1, seed=1, out=str(tmp_path),
                              tiny=True)
    results = module.main(args)
    assert set(results) == {"plain", "importance"}
    for method, r in results.items():
        assert 0.0 <= r["false_discovery_proportion"] <= 1.0 and 0.0 <= r["power"] <= 1.0
        assert (tmp_path / f"de_{method}.csv").exists() and (tmp_path / f"volcano_{method}.png").exists()
    assert "true FDP" in capsys.readouterr().out


def test_differential_expression_example_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert exit_.value.code == 0 and "--tiny" in capsys.readouterr().out
