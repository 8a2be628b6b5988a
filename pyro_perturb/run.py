"""The user-facing facade: :func:`fit`, :func:`load_run` and :class:`Run`.

A :class:`Run` holds a trained model and guide with everything needed to use them on new
data (the :class:`~pyro_perturb.data.DataSpec`, hyperparameters, training settings) and
is saved as a run directory::

    RUN_DIR/config.json     model name, hyperparameters, training settings, vocabularies,
                            data options and data source
    RUN_DIR/model.pt        best weights {"model": state_dict, "guide": state_dict, "sha256": digest}
    RUN_DIR/checkpoint.pt   full training state after the last epoch (resume)
    RUN_DIR/history.csv     loss per validation (train, validation; epoch, optimizer step)

Everything is JSON or weights-only tensors: loading a run never executes code from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch

from . import contract
from .data import DataSpec, PerturbationData
from .infer import distributed
from .infer.checkpoint import atomic_json, atomic_torch_save, safe_load
from .infer.engine import TrainConfig, resolve_device, train, write_history
from .infer.iwelbo import iwelbo as _iwelbo
from .registry import STEP_BUDGET_KEYS, build, get_entry, list_models
from .version import __version__

DATA_KEYS = (
    "perturbation_key",
    "control",
    "covariate_keys",
    "layer",
    "split_key",
    "combination_separator",
    "dose_key",
    "heldout_control_fraction",
)

# the built-in datasets used when no data is given: simulator name and encoding options
BUILTIN_DATA = {
    "combinatorial": {},
    "sparse_shift": {},
    "factorized": {"covariate_keys": ["cell_line"]},
    "comparative": {},
    "causal_dag": {},
    "cyclic_graph": {},
}


def builtin_data(name: str, seed: int = 0, **sizes):
    """A built-in simulated AnnData and the ``from_anndata`` options it needs."""
    from .data import simulate

    if name not in BUILTIN_DATA:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {sorted(BUILTIN_DATA)}")
    return getattr(simulate, name)(seed=seed, **sizes), dict(BUILTIN_DATA[name])


def read_data(path: str | os.PathLike, backed: bool = False):
    """Read an ``.h5ad`` with a clear error when it is missing or unreadable."""
    import anndata

    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {str(path)!r} does not exist")
    try:
        return anndata.read_h5ad(path, backed="r" if backed else None)
    except Exception as e:
        raise ValueError(f"could not read {str(path)!r} as an .h5ad file: {e}") from None


def hold_out_perturbations(adata, data_options: dict, seed: int, strict: bool = True):
    """``adata`` with whole perturbations held out as its test split when
    ``data_options["heldout_perturbations"]`` lists labels (``fit(...,
    heldout_perturbations=[...])``, ``--heldout-perturbations``): a copy whose
    ``obs[split_key]`` sends those labels' cells to ``test`` and the others' to
    train/val (:func:`~pyro_perturb.data.splits.heldout_perturbation_split`, seeded by
    ``seed``; a fraction of the controls then goes to test too, see ``split_key`` of
    :meth:`~pyro_perturb.data.PerturbationData.from_anndata`). Unchanged without such
    labels, or when the data already has the split column. ``strict``: every listed label
    must be in the data (training); otherwise the absent ones are skipped (other data
    encoded with the run's vocabulary)."""
    heldout = list(data_options.get("heldout_perturbations") or [])
    split_key = data_options.get("split_key") or "split"
    if not heldout or isinstance(adata, PerturbationData) or split_key in adata.obs.columns:
        if heldout and strict and not isinstance(adata, PerturbationData):
            raise ValueError(
                f"heldout_perturbations and the data's own split column obs[{split_key!r}] both say which cells "
                "are held out; drop one"
            )
        return adata
    from .data.splits import heldout_perturbation_split

    key = data_options.get("perturbation_key") or "perturbation"
    control = data_options.get("control") or "control"
    if control in heldout:
        raise ValueError(f"heldout_perturbations holds the control label {control!r}; training needs control cells")
    if key not in adata.obs.columns:
        return adata  # from_anndata names the missing column
    if not strict:
        present = set(adata.obs[key].astype(str).str.strip())
        heldout = [h for h in heldout if h in present]
        if not heldout:
            return adata
    if getattr(adata, "isbacked", False):
        raise ValueError(
            "heldout_perturbations needs the data in memory; with backed data write the split column into "
            "the file first (pyro_perturb.data.splits.heldout_perturbation_split) and pass split_key"
        )
    return heldout_perturbation_split(adata, heldout, perturbation_key=key, seed=seed, split_key=split_key)


class Run:
    """A trained (model, guide) pair with its data vocabulary and settings.

    Attributes:
        name: registered model name.
        model, guide: the trained modules.
        spec: the data vocabulary (:class:`~pyro_perturb.data.DataSpec`).
        hparams: model hyperparameters; train_config: training settings.
        data_options: how the training data were encoded (``perturbation_key``,
            ``split_key``...: the ``from_anndata`` options).
        data_source: where the training data came from, so that they can be rebuilt
            (:meth:`load_data`): ``{"path": absolute .h5ad path, "backed": bool}``, or
            ``{"builtin": simulator name, "seed": int, "sizes": {option: value}}`` for
            the built-in simulated data, or ``{}`` for data passed in memory (not
            rebuildable). Saved in ``config.json`` as ``"data_source"``.
        data: the training data as a :class:`~pyro_perturb.data.PerturbationData`:
            those :func:`fit` trained on, or, for a loaded run, rebuilt from
            ``data_source`` on first use.
        history: one row per validation (``history.csv``).
        path: the run directory, if saved.
    """

    def __init__(
        self,
        name: str,
        model,
        guide,
        spec: DataSpec,
        hparams: dict,
        train_config: TrainConfig,
        data_options: dict | None = None,
        history: list[dict] | None = None,
        path: str | os.PathLike | None = None,
        data_source: dict | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.guide = guide
        self.spec = spec
        self.hparams = hparams
        self.train_config = train_config
        self.data_options = data_options or {}
        self.history = history or []
        self.path = Path(path) if path is not None else None
        self.data_source = dict(data_source or {})
        self._data: PerturbationData | None = None
        # the training cells' library sizes (evaluate.depth.library_distribution); None
        # for runs saved before they were stored
        self.library_sizes: dict | None = None

    # ------------------------------------------------------------------ data
    @property
    def data(self) -> PerturbationData:
        if self._data is None:
            self._data = self.load_data()
        return self._data

    @data.setter
    def data(self, value: PerturbationData | None) -> None:
        self._data = value

    def load_data(self, backed: bool | None = None) -> PerturbationData:
        """The training data rebuilt from :attr:`data_source`, encoded with this run's
        vocabulary and split (``backed``: override the source's on-disk reading).
        Data that were passed in memory cannot be rebuilt: a ``ValueError`` says so."""
        source = self.data_source
        if source.get("path"):
            adata = read_data(source["path"], backed=source.get("backed", False) if backed is None else backed)
        elif source.get("builtin"):
            adata, _ = builtin_data(source["builtin"], seed=source.get("seed", 0), **source.get("sizes", {}))
        else:
            raise ValueError("the run was trained on in-memory data, which it cannot reload; pass the data explicitly")
        return self.encode(adata)

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.parameters()), torch.zeros(0)).device

    def encode(self, data, **options) -> PerturbationData:
        """Encode ``data`` (AnnData, path, or PerturbationData) with this run's vocabulary."""
        if isinstance(data, PerturbationData):
            if data.spec.perturbations != self.spec.perturbations and data.spec.genes == self.spec.genes:
                # e.g. the data a gene-graph model was given, before every gene joined its vocabulary
                from .data.targets import with_perturbation_vocabulary

                return with_perturbation_vocabulary(data, self.spec.perturbations)
            return data
        if isinstance(data, (str, os.PathLike)):
            data = read_data(data)
        opts = {"split_key": self.data_options.get("split_key", "split"), "seed": self.train_config.seed}
        if "heldout_control_fraction" in self.data_options:  # the training split's, so that controls match
            opts["heldout_control_fraction"] = self.data_options["heldout_control_fraction"]
        opts.update(options)
        data = hold_out_perturbations(data, self.data_options, self.train_config.seed, strict=False)
        return PerturbationData.from_anndata(data, spec=self.spec, **opts)

    # ------------------------------------------------------------------ estimands
    def iwelbo(self, data, split: str | None = "test", num_particles: int = 100, seed: int = 0) -> np.ndarray:
        """Per-cell held-out IWELBO of a split (see :mod:`pyro_perturb.infer.iwelbo`)."""
        data = self.encode(data)
        return _iwelbo(self.model, self.guide, data, split, num_particles, seed=seed, device=self.device)

    @torch.no_grad()
    def latents(self, data, batch_size: int = 1024, indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Posterior-mean latents ``{"X_latent": (n, L), ...}`` of every cell, or of the
        cells ``indices`` (rows in that order)."""
        data = self.encode(data)
        self.guide.eval()
        parts: dict[str, list] = {}
        idx = np.arange(data.n_cells) if indices is None else np.asarray(indices)
        for start in range(0, len(idx), batch_size):
            sub = idx[start : start + batch_size]
            out = self.guide.posterior_latents(data.batch(sub, device=self.device))
            for k, v in out.items():
                parts.setdefault(k, []).append(v.cpu().numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def predict(self, adata):
        """A copy of ``adata`` with the posterior-mean latents in ``obsm``."""
        if isinstance(adata, (str, os.PathLike)):
            adata = read_data(adata)
        data = self.encode(adata)
        out = adata.copy() if not adata.isbacked else adata.to_memory()
        for key, value in self.latents(data).items():
            out.obsm[key] = value
        return out

    def evaluate(
        self,
        data,
        num_particles: int = 100,
        out_dir: str | os.PathLike | None = None,
        seed: int = 0,
        **options,
    ) -> dict:
        """Metrics per split (see :func:`pyro_perturb.evaluate.evaluate_run`); ``options``
        go to the evaluators (e.g. ``ate_particles=500``)."""
        from .evaluate import evaluate_run

        return evaluate_run(self, self.encode(data), num_particles=num_particles, out_dir=out_dir, seed=seed, options=options)

    # ------------------------------------------------------------------ predictions
    def _canonical(self, labels) -> list[str]:
        from .data.anndata import canonical_label

        labels = [labels] if isinstance(labels, str) else list(labels)
        return [canonical_label(str(lab).strip(), self.spec.control, self.spec.separator) for lab in labels]

    def library_pools(self, labels, covariates=None, data=None) -> dict[str, np.ndarray]:
        """Observed library sizes per label (``{label: sizes}``), from the training cells'
        distribution stored at fit time (:func:`pyro_perturb.evaluate.depth.library_pools`:
        the label's training cells; for a label without any, those of ``covariates``,
        else all training cells). A run saved before that distribution was stored reads it
        from ``data`` (its training cells), or raises ValueError without it."""
        from .evaluate.depth import library_distribution, library_pools
        from .evaluate.groups import SEP, _cov_codes

        distribution = self.library_sizes
        if distribution is None:
            if data is None:
                raise ValueError(
                    "this run was saved without its training cells' library sizes (a run from before they "
                    "were stored): pass library=1e4 (--library 10000, the paper's fixed depth), or the data "
                    "(data=..., --data FILE.h5ad) to read them from its training cells"
                )
            distribution = library_distribution(self.encode(data))
        key = None
        if covariates is not None:
            codes = _cov_codes(self.spec, covariates)
            key = SEP.join(cats[c] for cats, c in zip(self.spec.covariate_categories, codes))
        return library_pools(distribution, self._canonical(labels), key)

    def _library(self, library, labels: list[str], covariates, data):
        if isinstance(library, str):
            if library != "observed":
                raise ValueError(f"library must be 'observed', a number or a mapping of label -> sizes, got {library!r}")
            return self.library_pools(labels, covariates, data)
        return library

    def effects(
        self,
        labels,
        num_particles: int | None = None,
        seed: int = 0,
        memory_mb: float | None = None,
        library="observed",
        estimator: str = "integrated",
        covariates=None,
        data=None,
        basal: str = "prior",
    ):
        """Model effects of perturbation labels (:class:`~pyro_perturb.evaluate.predictive.EffectPrediction`:
        ATE, mean log-normalised and normalised expression) by posterior predictive
        (:func:`~pyro_perturb.evaluate.predictive.model_effects`), on the run's device.

        ``num_particles``: default 250 with the integrated estimator, 2,500 (the paper's)
        with the sampled one (:func:`~pyro_perturb.evaluate.predictive.default_particles`).
        ``library``: ``"observed"`` (default: each label's cells drawn at its training
        cells' depths, see :meth:`library_pools`), a number (``1e4``: the paper's fixed
        depth) or a mapping ``{label: sizes}`` (the control included). ``estimator``:
        ``"integrated"`` (count noise integrated out) or ``"sampled"``. ``memory_mb``:
        working-memory budget (MB; default 1024); the result does not depend on it.
        ``covariates``: values of the drawn cells (default: the first of each key).
        ``basal``: ``"prior"`` (default, the paper's: basal states from the model's prior)
        or ``"controls"``: each particle's basal state is a posterior draw of one of the
        training control cells of ``data`` (of the same covariate values), decoded under
        each dosage (:class:`~pyro_perturb.evaluate.predictive.ControlCells`; models with
        basal sites, the others use the prior)."""
        from .evaluate.ate import basal_cells
        from .evaluate.predictive import model_effects

        labels = self._canonical(labels)
        library = self._library(library, [self.spec.control, *labels], covariates, data)
        if basal != "prior":
            if data is None:
                raise ValueError("basal='controls' needs data=... (the training control cells to draw basal states from)")
            cov = None
            if covariates is not None and self.spec.covariate_keys:
                from .evaluate.data_stats import COVARIATE_SEP
                from .evaluate.groups import _cov_codes

                codes = _cov_codes(self.spec, covariates)
                cov = COVARIATE_SEP.join(cats[c] for cats, c in zip(self.spec.covariate_categories, codes))
            basal = basal_cells(self.model, self.encode(data), basal, cov)
        return model_effects(self.model, self.guide, self.spec, labels, library=library, num_particles=num_particles,
                             seed=seed, estimator=estimator, device=self.device, memory_mb=memory_mb, covariates=covariates,
                             basal=basal)

    def ate(
        self,
        labels,
        num_particles: int | None = None,
        seed: int = 0,
        memory_mb: float | None = None,
        library="observed",
        estimator: str = "integrated",
        covariates=None,
        data=None,
        basal: str = "prior",
    ) -> pd.DataFrame:
        """Model ATE of perturbation labels (``"A"``, ``"A+B"``...; labels x genes): the
        ``ate`` of :meth:`effects` (same arguments). Combinations of known singles work
        for models that compose. ``library=1e4`` gives the paper's statistic."""
        return self.effects(labels, num_particles, seed, memory_mb, library, estimator, covariates, data, basal).ate

    def sample(
        self,
        labels,
        n_cells: int = 100,
        library="observed",
        seed: int = 0,
        covariates=None,
        data=None,
        sparse: bool = True,
        memory_mb: float | None = None,
    ):
        """Counterfactual cells: ``n_cells`` posterior predictive cells (counts) per label,
        as an AnnData ready for scanpy, pertpy or cell-eval.

        Each cell has its own draw of the global latents, of the basal state from the
        prior, of its library and of its counts
        (:func:`~pyro_perturb.evaluate.predictive.sample_cells`): a label's cells do not
        depend on the other labels asked.

        Returns:
            AnnData (labels x ``n_cells`` cells, genes): ``X`` the counts (float32 integers;
            CSR when ``sparse``), ``obs[spec.perturbation_key]`` the label, one column per
            covariate key (``covariates``, default the first category of each), and
            ``obs["library_size"]`` the library each cell was drawn at (its expected total);
            ``var_names`` the genes; ``uns["pyro_perturb"]`` the model, run directory, seed,
            library and cells per label.
        """
        import anndata
        import scipy.sparse as sp

        from .evaluate.groups import _cov_codes
        from .evaluate.predictive import describe_library, sample_cells

        labels = list(dict.fromkeys(self._canonical(labels)))
        if not labels:
            raise ValueError("no perturbation labels to sample")
        library = self._library(library, labels, covariates, data)
        cells = sample_cells(self.model, self.guide, self.spec, labels, n_cells, library=library, seed=seed,
                             device=self.device, memory_mb=memory_mb, covariates=covariates)
        counts = np.concatenate([cells[lab][0] for lab in labels])
        obs = pd.DataFrame(
            {self.spec.perturbation_key: pd.Categorical(np.repeat(labels, n_cells), categories=labels)},
            index=[f"{lab}_{i}" for lab in labels for i in range(n_cells)],
        )
        codes = _cov_codes(self.spec, covariates) if covariates is not None else (0,) * len(self.spec.covariate_keys)
        for key, cats, code in zip(self.spec.covariate_keys, self.spec.covariate_categories, codes):
            obs[key] = pd.Categorical([cats[code]] * len(obs), categories=cats)
        obs["library_size"] = np.concatenate([cells[lab][1] for lab in labels])
        adata = anndata.AnnData(sp.csr_matrix(counts) if sparse else counts, obs=obs,
                                var=pd.DataFrame(index=pd.Index(self.spec.genes)))
        adata.uns["pyro_perturb"] = {
            "model": self.name,
            "run": str(self.path) if self.path is not None else "",
            "seed": int(seed),
            "library": describe_library(library),
            "n_cells_per_label": int(n_cells),
            "version": __version__,
            "counts": "posterior predictive draws of counts (one draw of the global latents per cell)",
        }
        return adata

    def differential_expression(
        self,
        perturbation: str,
        control: str | None = None,
        delta: float | None = None,
        fdr: float = 0.05,
        method: str = "importance",
        data=None,
        **options: Any,
    ) -> pd.DataFrame:
        """Model-based differential expression of ``perturbation``'s cells against
        ``control``'s (default: the run's control label): per gene the posterior mean
        log2 fold change, ``P(|LFC| > delta)`` and the decision at posterior expected
        FDR ``fdr``; ``delta`` default :data:`~pyro_perturb.evaluate.de.DEFAULT_DELTA`
        (0.25, log2 units). ``data``: the cells (default: the training data); ``options``:
        see :func:`pyro_perturb.evaluate.de.differential_expression`."""
        from .evaluate.de import DEFAULT_DELTA, differential_expression

        return differential_expression(self, data, perturbation, control=control,
                                       delta=DEFAULT_DELTA if delta is None else delta, fdr=fdr, method=method,
                                       **options)

    # ------------------------------------------------------------------ gene graphs
    def _graph(self):
        from . import contract

        graph = contract.adjacency(self.model)
        if graph is None:
            graph_models = [e.name for e in list_models() if contract.has_adjacency(e.model_cls)]
            raise ValueError(
                f"model {self.name!r} has no gene graph (no adjacency()); the gene-graph models are: "
                f"{', '.join(graph_models) or 'none registered'}"
            )
        return graph

    def adjacency(self, threshold: float | None = None) -> pd.DataFrame:
        """The learned gene graph of a gene-graph model (DCD-FG, NODAGS-Flow): genes x
        genes DataFrame, entry ``[i, j]`` the weight of the edge gene i -> gene j (rows:
        source, columns: target); edge probabilities or magnitudes (see
        :class:`~pyro_perturb.contract.Adjacency`). ``threshold``: entries with ``|weight|
        <= threshold`` set to 0 (a number >= 0, <= 1 for probabilities). A model without a
        graph raises ValueError."""
        from .evaluate.graph import adjacency_frame

        return adjacency_frame(self._graph(), threshold)

    def edges(self, threshold: float | None = None, top: int | None = None) -> pd.DataFrame:
        """Edge list of the learned graph: columns ``source``, ``target``, ``weight``,
        strongest ``|weight|`` first; the edges with ``|weight| > threshold`` (default 0.5
        for probabilities, 0 for magnitudes: every non-zero edge), the first ``top``."""
        from .evaluate.graph import edge_list

        return edge_list(self._graph(), threshold, top)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {
            "pyro_perturb_version": __version__,
            "model": self.name,
            "hparams": self.hparams,
            "train": asdict(self.train_config),
            "spec": self.spec.to_dict(),
            "data": self.data_options,
            "data_source": self.data_source,
            **({"library_sizes": self.library_sizes} if self.library_sizes is not None else {}),
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path or self.path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_json(self.config(), path / "config.json")
        atomic_torch_save({"model": self.model.state_dict(), "guide": self.guide.state_dict()}, path / "model.pt")
        write_history(self.history, path / "history.csv")
        self.path = path
        return path

    def __repr__(self) -> str:
        return f"Run({self.name!r}, {self.spec.n_genes} genes, {self.spec.n_perturbations} perturbations, path={self.path})"


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{path} is not a run directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    for key in ("model", "hparams", "train", "spec"):
        if key not in cfg:
            raise ValueError(f"{cfg_path} lacks the entry {key!r}")
    return cfg


def _data_config(cfg: dict) -> tuple[dict, dict]:
    """``(data_options, data_source)`` of a run's config; configs written before
    ``data_source`` had its own key kept it in the options, as ``"source"``."""
    options = dict(cfg.get("data", {}))
    legacy = options.pop("source", None)
    return options, dict(cfg.get("data_source", legacy) or {})


def load_run(path: str | os.PathLike, device: str = "cpu") -> Run:
    """Rebuild a :class:`Run` from its directory alone (JSON config, weights-only tensors)."""
    path = Path(path)
    cfg = _read_config(path)
    spec = DataSpec.from_dict(cfg["spec"])
    model, guide, hparams = build(cfg["model"], spec, cfg["hparams"])
    weights = safe_load(path / "model.pt")
    if not isinstance(weights, dict) or not {"model", "guide"} <= set(weights):
        raise ValueError(f"{path / 'model.pt'} does not hold model and guide weights")
    try:
        model.load_state_dict(weights["model"])
        guide.load_state_dict(weights["guide"])
    except RuntimeError as e:
        raise ValueError(f"{path / 'model.pt'} does not match the model in config.json: {str(e)[:300]}") from None
    train_cfg = TrainConfig(**cfg["train"])
    dev = resolve_device(device)
    model.to(dev)
    guide.to(dev)
    model.eval()
    guide.eval()
    history = []
    if (path / "history.csv").exists():
        history = pd.read_csv(path / "history.csv").to_dict("records")
    data_options, data_source = _data_config(cfg)
    run = Run(cfg["model"], model, guide, spec, hparams, train_cfg, data_options, history, path, data_source)
    run.library_sizes = cfg.get("library_sizes")
    return run


def split_settings(model: str, settings: dict[str, Any]) -> tuple[dict, dict]:
    """Split ``key=value`` settings into model hyperparameters and training settings."""
    entry = get_entry(model)
    hp_keys = set(entry.hyperparameters())
    train_keys = TrainConfig.keys()
    hparams, train_cfg = {}, {}
    for k, v in settings.items():
        if k in hp_keys:
            hparams[k] = v
        elif k in train_keys:
            train_cfg[k] = v
        else:
            raise ValueError(
                f"unknown setting {k!r} for model {model!r}; model hyperparameters: "
                f"{', '.join(sorted(hp_keys))}; training settings: {', '.join(sorted(train_keys))}"
            )
    return hparams, train_cfg


def fit(
    data=None,
    model: str = "cvae",
    out: str | os.PathLike | None = None,
    resume: bool = False,
    callback=None,
    data_seed: int | None = None,
    backed: bool | None = None,
    **settings: Any,
) -> Run:
    """Train a registered model; return its :class:`Run` (saved to ``out`` when given).

    Args:
        data: an AnnData, an ``.h5ad`` path, a :class:`PerturbationData`, or ``None``
            for the model's built-in simulated dataset.
        model: registered name (``pyro-perturb models`` lists them).
        out: run directory (config, weights, checkpoints, history).
        resume: continue the interrupted run in ``out`` (its saved settings are used;
            ``max_epochs`` and ``max_steps`` may be raised).
        callback: ``callback(epoch, history_row)`` after every epoch.
        backed: open an ``.h5ad`` path read-only on disk (``backed="r"``): counts are
            read minibatch by minibatch and never loaded whole (out-of-core training;
            see ``shuffle_block_size`` for faster reads). Default: as the resumed run,
            else in memory.
        **settings: data options (``perturbation_key``, ``control``, ``covariate_keys``,
            ``layer``, ``split_key``, ``combination_separator``, ``dose_key``,
            ``heldout_perturbations``: labels whose cells all form the test split, see
            :func:`hold_out_perturbations`), model
            hyperparameters (e.g. ``n_latent``) and training settings
            (:class:`~pyro_perturb.infer.TrainConfig`), over the model's registered
            defaults. The training budget: the registered defaults cap it in optimizer
            steps (``max_steps``, the same whatever the data's size) and in epochs
            (``max_epochs``); an explicit ``max_epochs`` without ``max_steps`` is the
            whole budget (the registered ``max_steps`` and ``val_every_steps`` are then
            not used), as it was before step budgets existed.

    The returned run's ``data`` is the encoded training data, and its ``data_source``
    says where they came from (:class:`Run`). A gene-graph model (one with
    ``adjacency()``) gets every measured gene in its vocabulary of perturbations
    (:func:`~pyro_perturb.data.targets.with_gene_perturbations`): it can predict the
    knockout of a gene it never saw perturbed.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), it starts the process group and
    trains data-parallel (:mod:`pyro_perturb.infer.distributed`); only rank 0 writes
    ``out``.
    """
    entry = get_entry(model)
    data_options = {k: settings.pop(k) for k in DATA_KEYS if k in settings}
    heldout = settings.pop("heldout_perturbations", None)
    if heldout:
        heldout = [heldout] if isinstance(heldout, str) else [str(h).strip() for h in heldout]
        data_options["heldout_perturbations"] = heldout
    out = Path(out) if out is not None else None
    if resume:
        if out is None:
            raise ValueError("resume needs the run directory (out=...)")
        saved = _read_config(out)
        if saved["model"] != model:
            raise ValueError(f"{out} holds a {saved['model']!r} run, not {model!r}")
        budget = {k: settings[k] for k in ("max_epochs", "max_steps") if settings.get(k)}
        hparams = saved["hparams"]
        train_cfg = TrainConfig(**{**saved["train"], **budget})
        saved_options, saved_source = _data_config(saved)
        data_options = saved_options if not data_options else data_options
    else:
        hparams, train_kwargs = split_settings(model, settings)
        defaults = dict(entry.train_defaults)
        if "max_epochs" in train_kwargs and "max_steps" not in train_kwargs:
            for key in STEP_BUDGET_KEYS:  # an explicit epoch budget is the whole budget
                defaults.pop(key, None)
        train_cfg = TrainConfig(**{**defaults, **train_kwargs})
        saved_source = {}

    if data is None and saved_source.get("path"):
        data = saved_source["path"]
        backed = saved_source.get("backed", False) if backed is None else backed
    if data is None:
        builtin = saved_source.get("builtin", entry.default_data)
        seed = data_seed if data_seed is not None else saved_source.get("seed", train_cfg.seed)
        sizes = dict(saved_source.get("sizes", {}))
        adata, builtin_opts = builtin_data(builtin, seed=seed, **sizes)
        data_options = {**builtin_opts, **data_options}
        data_source = {"builtin": builtin, "seed": seed, "sizes": sizes}
    elif isinstance(data, (str, os.PathLike)):
        data_source = {"path": str(Path(data).resolve()), "backed": bool(backed)}
        adata = read_data(data, backed=bool(backed))
    else:
        adata = data
        data_source = saved_source  # in memory: a resumed run keeps the source it had

    if isinstance(adata, PerturbationData):
        if data_options.get("heldout_perturbations"):
            raise ValueError("heldout_perturbations needs an AnnData (or .h5ad), not an encoded PerturbationData")
        pdata = adata
    else:
        adata = hold_out_perturbations(adata, data_options, train_cfg.seed)
        opts = {k: v for k, v in data_options.items() if k in DATA_KEYS}
        pdata = PerturbationData.from_anndata(adata, seed=train_cfg.seed, **opts)
    if entry.needs_perturbations and pdata.spec.n_perturbations == 0:
        raise ValueError(
            f"model {model!r} needs perturbed cells, but obs[{pdata.spec.perturbation_key!r}] holds only the "
            f"control label {pdata.spec.control!r}; check the column and control=... (--control), or train a "
            f"model of unperturbed cells: {', '.join(e.name for e in list_models() if not e.needs_perturbations)}"
        )

    from . import contract

    if contract.has_adjacency(entry.model_cls):  # a gene graph can intervene on any of its genes
        from .data.targets import with_gene_perturbations

        pdata = with_gene_perturbations(pdata)

    # parameter initialisation is part of what the seed fixes
    pyro.set_rng_seed(train_cfg.seed)
    model_obj, guide_obj, full_hparams = build(model, pdata.spec, hparams, gene_stats=pdata.gene_stats("train"))
    # data-derived buffers (e.g. scVI's library prior; a resumed run then loads its checkpoint's)
    contract.init_from_data(model_obj, guide_obj, pdata)
    run = Run(model, model_obj, guide_obj, pdata.spec, full_hparams, train_cfg, data_options, path=out,
              data_source=data_source)
    run.data = pdata
    from .evaluate.depth import library_distribution  # evaluate's modules load on first use

    run.library_sizes = library_distribution(pdata)  # predictions at the data's depth need no data
    ctx = distributed.init_from_env(train_cfg.device)  # single process unless torchrun set WORLD_SIZE
    if out is not None:
        if not resume and (out / "checkpoint.pt").exists():
            raise ValueError(f"{out} already holds a run; pass resume=True (--resume) or choose another directory")
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_json(run.config(), out / "config.json")
    run.history = train(model_obj, guide_obj, pdata, train_cfg, run_dir=out, resume=resume, callback=callback)
    if out is not None and ctx.is_main:
        run.save(out)
    return run
