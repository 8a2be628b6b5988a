"""Every benchmark script (bench/*.py, bench/fcr_diag/*.py) is a command-line program: ``--help``
exits 0 with a usage line, and importing it does no work (prints nothing, trains nothing).

``--help`` runs in subprocesses started together (they are independent), with PYTHONPATH set
to this checkout so that they import this ``pyro_perturb``; the import check runs in this
process (torch is already imported here, so it costs little).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "bench" / "fcr_diag").glob("*.py"))
TIMEOUT_S = 120


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """``--help`` of every script, run in parallel; by script path relative to the repository."""
    cwd = tmp_path_factory.mktemp("bench_cwd")  # scripts must not depend on the working directory
    commands = {str(p.relative_to(ROOT)): [sys.executable, str(p), "--help"] for p in SCRIPTS}
    procs = {name: subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    done = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = subprocess.CompletedProcess(commands[name], proc.returncode, out, err)
    return done


def test_scripts_found():
    names = {p.name for p in SCRIPTS}
    assert {"sams_vae_benchmark.py", "train_throughput.py", "ceiling.py"} <= names


@pytest.mark.parametrize("script", [str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_help_exits_zero(finished, script):
    result = finished[script]
    assert result.returncode == 0, f"{script} --help: exit {result.returncode}\n{result.stderr[-2000:]}"
    assert result.stdout.startswith("usage:"), result.stdout[:500]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_import_does_no_work(script, capsys, monkeypatch):
    """Run as a module (not ``__main__``), a script only defines things: no output, no argv."""
    monkeypatch.setattr(sys, "argv", ["not-a-benchmark-argument"])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    before = set(sys.modules)
    try:
        namespace = runpy.run_path(str(script), run_name="bench_import_check")
    finally:  # sibling scripts imported by this one (e.g. ``ceiling``) are not left behind
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(ROOT / "bench")):
                del sys.modules[name]
    assert callable(namespace.get("main")), "no main()"
    assert capsys.readouterr().out == ""


def test_gpu_check_dry_run_on_cpu(tmp_path, monkeypatch):
    """bench/gpu_check.sh is correct by construction: its shell syntax parses, and its
    Python part runs every step on the CPU at tiny sizes and writes its figures."""
    import json

    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench"), *sys.path])
    namespace = runpy.run_path(str(ROOT / "bench" / "gpu_check.py"), run_name="gpu_check_dry_run")
    import torch

    threads = torch.get_num_threads()
    try:
        namespace["main"](namespace["parse_args"](["--device", "cpu", "--tiny", "--threads", "1", "--out", str(tmp_path)]))
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {r["model"] for r in results["throughput"]} == {"sams_vae", "cpa_vae", "cvae"}
    assert all(r["cells_per_s"] > 0 for r in results["throughput"])
    assert set(results["ate"]["estimators"]) == {"integrated", "sampled"} and results["ate"]["treatment_batch_for_budget"] >= 1
    assert results["compare"]["pass"] and len(results["compare"]["cases"]) == 4
    assert "## Model ATE" in (tmp_path / "gpu_check").with_suffix(".md").read_text()
