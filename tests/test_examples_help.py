"""Every example follows Pyro's examples convention: ``main(args)``, its argparse parser
under ``if __name__ == "__main__"``, ``--help``, and the tiny-setting flag the smoke tests
(tests/test_examples_*.py) stand for."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "name, smoke_flag",
    [
        ("sams_vae_perturbseq", "--tiny"),
        ("sams_vae_walkthrough", "--num-steps"),
        ("svae_simulation", "--tiny"),
        ("fcr_cell_context", "--tiny"),
        ("comparative_perturbseq", "--tiny"),
        ("causal_graph", "--tiny"),
    ],
)
def test_example_has_help_and_its_smoke_flag(name, smoke_flag, monkeypatch, capsys):
    path = EXAMPLES / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")  # as `python examples/<name>.py --help`
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and smoke_flag in out
    source = path.read_text()
    assert "def main(args)" in source and source.rstrip().endswith("main(args)")
