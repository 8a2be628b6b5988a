"""The ``pyro-perturb`` command end to end on a tiny simulated file."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from pyro_perturb.cli import main

TINY = ["--set", "n_singles=4", "--set", "n_doubles=2", "--set", "cells_per_perturbation=30",
        "--set", "n_control_cells=60", "--set", "n_genes=30", "--set", "n_ate_draws=50"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.h5ad"
    assert main(["simulate", "combinatorial", "--out", str(path), "--seed", "1", *TINY]) == 0
    return path


def test_models_lists_cvae(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("cvae ") for line in out.splitlines())


@pytest.mark.parametrize("kind", ["sparse-shift", "combinatorial", "factorized"])
def test_simulate_writes_h5ad(tmp_path, kind):
    out = tmp_path / "sim.h5ad"
    sizes = {
        "sparse-shift": ["--set", "n_perturbations=6", "--set", "cells_per_perturbation=10", "--set", "n_heldout=2", "--set", "n_control_cells=10"],
        "combinatorial": TINY,
        "factorized": ["--set", "n_covariates=2", "--set", "n_treatments=2", "--set", "cells_per_group=10", "--set", "n_heldout_pairs=1"],
    }[kind]
    assert main(["simulate", kind, "--out", str(out), *sizes]) == 0
    adata = ad.read_h5ad(out)
    assert "ground_truth" in adata.uns and "z_true" in adata.obsm


def test_fit_evaluate_predict(tiny_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["fit", "--model", "cvae", "--data", str(tiny_file), "--out", str(run_dir), "--max-epochs", "2",
            "--batch-size", "64", "--n-latent", "3", "--seed", "0", "--device", "cpu", "--set", "n_hidden=16", "--quiet"]
    assert main(args) == 0
    assert {"config.json", "model.pt", "history.csv", "checkpoint.pt"} <= {p.name for p in run_dir.iterdir()}
    metrics_path = tmp_path / "eval" / "metrics.json"
    assert main(["evaluate", str(run_dir), "--data", str(tiny_file), "--out", str(metrics_path), "--num-particles", "5",
                 "--ate-particles", "20", "--ate-memory-mb", "512", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    # the model beside the baselines, as a table, after metrics.json is written
    assert "model vs baselines" in printed and "lognorm_delta, all labels" in printed and "pseudobulk_lfc" in printed
    assert "pearson_delta" in printed and "mean_effect" in printed and "*" in printed
    metrics = json.loads(metrics_path.read_text())
    assert {"model", "no_change", "mean_effect", "empirical"} <= set(metrics["comparison"]["lognorm_delta"]["seen"])
    assert (metrics_path.parent / "comparison.csv").exists()
    assert metrics["ate"]["num_particles"] == 20 and "ate_pearson" in metrics["ate"]["all"]
    assert metrics["ate"]["memory_mb"] == 512
    assert (metrics_path.parent / "ate_model.csv").exists()
    assert not list(metrics_path.parent.glob("*.png")) and not (metrics_path.parent / "ppc.nc").exists()
    for split in ("train", "val", "test"):
        assert metrics[split]["n_cells"] > 0 and np.isfinite(metrics[split]["iwelbo"])
    # the run remembers its data: evaluate works without --data too
    assert main(["evaluate", str(run_dir), "--out", str(tmp_path / "m2.json"), "--num-particles", "2"]) == 0
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(run_dir), "--data", str(tiny_file), "--out", str(out)]) == 0
    assert ad.read_h5ad(out).obsm["X_latent"].shape[1] == 3
    # resume continues to a larger epoch budget
    assert main(["fit", "--model", "cvae", "--out", str(run_dir), "--resume", "--max-epochs", "3", "--quiet"]) == 0
    assert len(open(run_dir / "history.csv").read().strip().splitlines()) == 4


def _error(capsys, args):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_gives_one_line_error(tiny_file, tmp_path, capsys):
    base = ["fit", "--model", "cvae", "--data", str(tiny_file), "--out", str(tmp_path / "r"), "--max-epochs", "1", "--quiet"]
    assert "control label 'ctrl' not found" in _error(capsys, base + ["--control", "ctrl"])
    assert "perturbation column 'gene' not found" in _error(capsys, base + ["--perturbation-key", "gene"])
    assert "unknown setting 'n_latnet'" in _error(capsys, base + ["--set", "n_latnet=3"])
    assert "unknown model 'nope'" in _error(capsys, ["fit", "--model", "nope", "--out", str(tmp_path / "x")])
    assert "does not exist" in _error(capsys, ["fit", "--model", "cvae", "--data", str(tmp_path / "none.h5ad"), "--out", str(tmp_path / "y")])
    assert "not a run directory" in _error(capsys, ["evaluate", str(tmp_path), "--out", str(tmp_path / "m.json")])
    # a perturbation the model never learned, at prediction time
    run_dir = tmp_path / "ok"
    assert main(["fit", "--model", "cvae", "--data", str(tiny_file), "--out", str(run_dir), "--max-epochs", "1", "--quiet", "--set", "n_hidden=8"]) == 0
    adata = ad.read_h5ad(tiny_file)
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str)
    adata.obs.iloc[0, adata.obs.columns.get_loc("perturbation")] = "p_unknown"
    bad = tmp_path / "bad.h5ad"
    adata.write_h5ad(bad)
    assert "never learned: 'p_unknown'" in _error(capsys, ["predict", str(run_dir), "--data", str(bad), "--out", str(tmp_path / "p.h5ad")])


@pytest.mark.filterwarnings("ignore:Variable names are not unique")  # anndata reading the duplicated file
def test_bad_data_gives_one_line_error(tmp_path, capsys):
    """Data that encodes but cannot train sensibly: refused with exit status 2."""
    from .test_data import make_adata

    def fit_args(adata, name, model="cvae"):
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)
        return ["fit", "--model", model, "--data", str(path), "--out", str(tmp_path / f"run_{name}"),
                "--max-epochs", "1", "--quiet", "--set", "n_hidden=8"]

    duplicated = make_adata()
    duplicated.var_names = ["g0", "g1", "g0"] + [f"h{i}" for i in range(9)]
    assert "gene names (adata.var_names) are not unique: 'g0'" in _error(capsys, fit_args(duplicated, "dup"))
    huge = make_adata(sparse=False)
    huge.X = huge.X.astype(np.float64)
    huge.X[0, 0] = 1e30
    assert "counts above 16,777,216" in _error(capsys, fit_args(huge, "huge"))
    assert "3 cells are too few to split" in _error(capsys, fit_args(make_adata(n_per=1, labels=("control", "A", "B")), "three"))
    controls = make_adata(labels=("control",), n_per=40)
    assert "model 'cvae' needs perturbed cells" in _error(capsys, fit_args(controls, "controls"))
    assert main(fit_args(controls, "controls_vae", model="vae")) == 0  # a plain VAE needs no labels


def test_predict_perturbations_writes_counterfactual_cells(tiny_file, tmp_path, capsys):
    """``predict --perturbations``: predicted counts per label as an AnnData that reads back."""
    import scipy.sparse as sp

    run_dir = tmp_path / "run"
    assert main(["fit", "--model", "sams_vae", "--data", str(tiny_file), "--out", str(run_dir), "--max-epochs", "1",
                 "--n-latent", "3", "--set", "n_hidden=8", "--quiet"]) == 0
    out = tmp_path / "cells.h5ad"
    assert main(["predict", str(run_dir), "--perturbations", "p001+p000, p002", "--n-cells", "20", "--seed", "1",
                 "--out", str(out)]) == 0
    assert "40 predicted cells" in capsys.readouterr().out
    cells = ad.read_h5ad(out)
    genes = list(ad.read_h5ad(tiny_file).var_names)
    assert cells.shape == (40, len(genes)) and list(cells.var_names) == genes
    assert sp.issparse(cells.X) and cells.X.dtype == np.float32
    x = cells.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x)) and x.sum() > 0
    assert list(cells.obs["perturbation"].astype(str)) == ["p000+p001"] * 20 + ["p002"] * 20
    assert (cells.obs["library_size"] > 0).all() and cells.obs["library_size"].nunique() > 1  # observed depths
    info = cells.uns["pyro_perturb"]
    assert info["model"] == "sams_vae" and info["seed"] == 1 and info["library"].startswith("observed")
    # the paper's fixed depth, dense
    fixed = tmp_path / "fixed.h5ad"
    assert main(["predict", str(run_dir), "--perturbations", "p002", "--n-cells", "5", "--library", "10000",
                 "--dense", "--out", str(fixed)]) == 0
    cells = ad.read_h5ad(fixed)
    assert isinstance(cells.X, np.ndarray) and (cells.obs["library_size"] == 1e4).all()
    assert cells.uns["pyro_perturb"]["library"] == "fixed 10000"
    # bad input: one line, exit 2
    err = _error(capsys, ["predict", str(run_dir), "--perturbations", "p002,p_unknown", "--out", str(tmp_path / "x.h5ad")])
    assert "'p_unknown'" in err and "vocabulary" in err
    assert "--library" in _error(capsys, ["predict", str(run_dir), "--perturbations", "p002", "--library", "deep",
                                         "--out", str(tmp_path / "x.h5ad")])
    assert "--perturbations" in _error(capsys, ["predict", str(run_dir), "--out", str(tmp_path / "x.h5ad")])
    assert not (tmp_path / "x.h5ad").exists()


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "pyro_perturb.cli", "models"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "cvae" in result.stdout


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    captured = capsys.readouterr()
    summary = captured.out[captured.out.index("== pyro-perturb demo"):]
    assert "fitted   sams_vae on" in summary and "epochs" in summary and "steps" in summary
    assert "held-out doubles" in summary and "additive" in summary and "no_change" in summary
    assert "pearson_delta" in summary and "mse_delta" in summary and "metrics.json" in summary
    assert "ate_scatter.png" in summary and "comparison.csv" in summary
    assert "epochs" in captured.err  # the training progress bar
    assert (tmp_path / "demo" / "summary.txt").read_text().strip() == summary.strip()
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["iwelbo"])
    assert (tmp_path / "demo" / "summary.txt").exists()
