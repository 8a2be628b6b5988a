"""pyro-perturb: a Pyro model zoo for single-cell perturbation data.

Explicit Pyro models with amortised guides (SAMS-VAE and its baselines, the sVAE family,
FCR), trained by SVI on AnnData, evaluated by held-out IWELBO and posterior predictive.

Quick start::

    import pyro_perturb as pp
    adata = pp.simulate.combinatorial(seed=0)
    run = pp.fit(adata, model="cvae", out="runs/cvae", max_epochs=50)
    metrics = run.evaluate(adata)
"""

from .version import __version__
from .data import Batch, DataSpec, PerturbationData, simulate, splits  # noqa: E402
from .registry import list_models  # noqa: E402
from .run import Run, fit, load_run  # noqa: E402

__all__ = [
    "Batch",
    "DataSpec",
    "PerturbationData",
    "Run",
    "fit",
    "list_models",
    "load_run",
    "simulate",
    "splits",
    "__version__",
]
