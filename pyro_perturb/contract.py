"""The zoo's model/guide contract, written once.

A registered entry of the zoo (:mod:`pyro_perturb.registry`) is a pair of classes, a Pyro
model and its guide. The training engine, the evaluators and the registry rely on what
this module states and on nothing else: they never ask a model or guide for an attribute
themselves, they call the accessor functions below, which are the only place where an
optional capability is looked up and where its default lives.

Required of every pair
----------------------
Construction
    ``Model(spec: DataSpec, **hyperparameters)`` and ``Guide(spec, **hyperparameters)``,
    both :class:`pyro.nn.PyroModule`. Every hyperparameter is a keyword argument with a
    default and a type annotation (``int``, ``float``, ``str`` or ``bool``; a
    ``typing.Literal`` of strings lists a ``str`` hyperparameter's own choices). The registry
    reads them from the two ``__init__`` signatures: a name in both must have the same
    default; every value is checked against its annotation (``int`` hyperparameters are
    sizes or counts: positive integers) and the registry's table of ranges before the
    classes are built (:func:`pyro_perturb.registry.check_hyperparameters`); each class
    receives the names its signature accepts.

Model (:class:`ZooModel`)
    ``max_plate_nesting: int``, the number of nested plates (1 in the zoo: the cells).
    ``forward(batch: Batch, observe: bool = True) -> Tensor``:

    * global latent sites (parameters shared by all cells, e.g. SAMS-VAE's ``"E"``,
      ``"M"``) are sampled outside any plate;
    * local latent sites (one value per cell) are sampled inside
      ``pyro.plate(CELL_PLATE, batch.n_cells, subsample=batch.index)``, which scales them
      by ``n_cells / B``; latent sites are scaled by ``batch.kl_weight`` with
      ``poutine.scale`` (KL annealing; times the model's own KL weight if it has one);
    * the counts are the site :data:`OBSERVED_SITE` inside the cell plate, scored against
      ``batch.x`` when ``observe`` is true and ``batch.x`` is not None, drawn otherwise
      (posterior predictive); ``forward`` returns its value, ``(B, G)`` (with particle
      dimensions when vectorised);
    * every tensor is created from an input's device and dtype (the pair runs on CUDA).

Guide (:class:`ZooGuide`)
    ``forward(batch: Batch, observe: bool = True) -> None``, the model's signature (Pyro
    calls both with the same arguments): samples every latent site of the model, with the
    same names, plates and scaling. With ``batch.x is None`` it samples the global sites
    only: the local ones then come from the model's prior given ``(d, c)``
    (counterfactual prediction, :mod:`pyro_perturb.evaluate.groups`).
    ``posterior_latents(batch) -> dict[str, Tensor]``: posterior means of the batch's
    cells, always ``"X_latent"`` ``(B, L)`` (what ``Run.latents`` and ``predict`` return),
    plus optional named blocks ``"X_<block>"`` ``(B, L_block)`` (:func:`latent_blocks`).

Optional capabilities
---------------------
Each is a member of the model or guide class with the name and shape given; the accessor
function is what the rest of the package calls, and returns the default when the class
does not define the member.

:func:`composes` (model ``composes: bool``; default True)
    The model predicts combinations of seen single perturbations it never saw
    (SAMS-VAE: yes; the sVAE family, one parameter per label: no).
:func:`n_latent` (model ``n_latent: int``; default 0)
    Latent width per cell (the ATE memory model).
:func:`likelihood_kind` (model ``likelihood.kind: str``; default ``"nb"``)
    ``"nb"``, ``"zinb"``, ``"poisson"`` or ``"gaussian"`` (draws of ``log1p(1e4 x / l)``).
:func:`optimizer_settings` (default: no multipliers, no adversary)
    ``lr_multipliers: dict[str, float]`` of the model and of the guide (parameter-name
    substring -> learning-rate factor); the model's ``adversary: nn.Module``, trained by
    its own Adam at ``adversary_lr: float`` (default: the training lr) on
    ``adversary_loss(guide, batch) -> Tensor``.
:func:`auxiliary_loss` (model ``auxiliary_loss(guide, batch) -> Tensor``; default None)
    Added to the negative ELBO of each training step.
:func:`training_loss` (model ``training_loss(elbo, guide, batch) -> Tensor``; default None)
    What a training step differentiates in place of ``elbo.differentiable_loss(model,
    guide, batch)`` (the auxiliary loss is still added): for a model that weighs several
    objectives by their gradients (MO-cVAE's min-norm weights of the background and target
    ELBOs). Single-process training only. Validation and evaluation keep the plain ELBO.
:func:`target_scores` (guide or model ``target_scores() -> TargetScores | None``; default None)
    Which latents each perturbation acts on; the guide's wins (masks live in guides).
:func:`mask_probabilities` (guide ``mask_probabilities() -> Tensor (R, L)``, no grad, and ``mask_labels() -> list[str]`` (R); default None)
    The sparse latent masks ``q(mask = 1)`` and their rows, as :class:`MaskProbabilities`.
:func:`cached_posterior` (guide ``cached_posterior(batch, differentiable) -> {block: (loc, scale)}``; default the guide's ``posterior(batch)``)
    The guide's posterior for a model's regularisers (FCR), reusing this step's pass.
:func:`treatment_network_width` (guide ``treatment_network() -> nn.Module``; default 0)
    Width of the guide network run once per treatment and particle (the ATE memory model).
:func:`basal_sites` (model ``basal_sites: tuple[str, ...]``; default ``()``)
    The local sites that hold a cell's unperturbed state: their prior depends on neither
    the dosage nor the label (SAMS-VAE's ``z_basal``, the conditional VAE's ``z``), so a
    control cell's posterior draw of them, decoded under another dosage, is that cell's
    counterfactual (the model effects' ``basal="controls"``).
:func:`adjacency` (model ``adjacency() -> Adjacency``; default None)
    The learned gene graph of a gene-graph model (DCD-FG, NODAGS-Flow): ``(G, G)``
    weights, entry ``[i, j]`` the edge from gene i to gene j (``Run.adjacency``);
    :func:`has_adjacency` tells it of a model class before it is built.
:func:`bind_model` (guide ``bind_model(model) -> None``; default: nothing)
    A guide that reads its model's point estimates (DCD-FG's factor values, NODAGS-Flow's
    SEM noise, for ``posterior_latents``) is handed the model once, when the pair is built.
:func:`transfer_parameters` (model and guide ``transfer_parameters(label_codes, reset=True) -> [(parameter, rows)]``; default [])
    What an out-of-distribution transfer fits for held-out labels.
:func:`uses_dosage` (model ``uses_dosage: bool``; default True)
    Whether the model's counts depend on the dosage at all (plain scVI: no); the ATE
    evaluator skips a model that ignores it (its ATE is zero by construction).
:func:`init_from_data` (model and guide ``init_from_data(data: PerturbationData) -> None``; default nothing)
    Statistics of the training cells a pair keeps as buffers (scVI's per-batch library
    prior), set once after building by :func:`pyro_perturb.fit` (saved with the weights).

:func:`latent_blocks` reads the optional blocks of ``posterior_latents``;
:func:`check_pair` checks a built pair against all of the above (the zoo's tests run it on
every registered entry).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any, Callable, Mapping, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import nn

from .data import Batch

#: name of the plate of cells, the one plate every model opens (subsampled by batch.index)
CELL_PLATE = "cells"
#: name of the observed count site, inside the cell plate
OBSERVED_SITE = "x"
#: key of the required entry of ``posterior_latents``
LATENT_KEY = "X_latent"


# --------------------------------------------------------------------------- required


@runtime_checkable
class ZooModel(Protocol):
    """What every model is (besides a ``PyroModule`` built as ``Model(spec, **hp)``)."""

    max_plate_nesting: int

    def forward(self, batch: Batch, observe: bool = True) -> torch.Tensor:
        """Score (or draw) the counts at :data:`OBSERVED_SITE`; see the module docstring."""


@runtime_checkable
class ZooGuide(Protocol):
    """What every guide is (besides a ``PyroModule`` built as ``Guide(spec, **hp)``)."""

    def forward(self, batch: Batch, observe: bool = True) -> None:
        """Sample the model's latent sites (only the global ones when ``batch.x is None``)."""

    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Posterior means: ``{"X_latent": (B, L), "X_<block>": (B, L_block), ...}``."""


# --------------------------------------------------------------------------- return shapes


class TargetScores(NamedTuple):
    """Which latents each perturbation acts on, as scored by a trained pair.

    Attributes:
        scores: ``(R, L)`` float array, one row per entry of ``labels``.
        is_mask: True when ``scores`` are probabilities that a latent is a target (called
            targets where > 0.5); False for magnitudes (ranked: top-k per row).
        labels: the R row names (perturbation labels or single perturbations of the
            data's :class:`~pyro_perturb.data.DataSpec`).
    """

    scores: np.ndarray
    is_mask: bool
    labels: list[str]


class MaskProbabilities(NamedTuple):
    """A guide's sparse latent masks: ``probabilities`` ``(R, L)`` of ``q(mask = 1)`` (a
    float array), one row per entry of ``labels`` (the treatments the masks belong to)."""

    probabilities: np.ndarray
    labels: list[str]


class Adjacency(NamedTuple):
    """A gene-graph model's learned graph.

    Attributes:
        weights: ``(G, G)`` float array; ``weights[i, j]`` scores the edge gene i -> gene j
            (zero on the diagonal).
        is_probability: True when ``weights`` are edge probabilities (called edges where
            > 0.5); False for magnitudes (e.g. ``|W|`` of a linear SEM: ranked, thresholded
            by the user).
        genes: the G gene names, in the order of the rows and columns.
    """

    weights: np.ndarray
    is_probability: bool
    genes: list[str]


class OptimizerSettings(NamedTuple):
    """What a pair asks of the training engine's optimisers.

    Attributes:
        lr_multipliers: ``{substring: factor}``: parameters whose name contains the
            substring train at ``lr * factor`` (the model's, then the guide's, merged).
        adversary: a module trained by its own Adam on the model's ``adversary_loss``
            (its parameters are left out of the main optimiser), or None.
        adversary_lr: that Adam's learning rate (None: the training ``lr``).
    """

    lr_multipliers: dict[str, float]
    adversary: nn.Module | None
    adversary_lr: float | None


def as_array(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor (any device, with or without grad) or array as a float64 numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float)


# --------------------------------------------------------------------------- accessors


def _member(obj, name: str):
    """The one lookup of an optional member of a model or guide (None when absent)."""
    return getattr(obj, name, None)


def composes(model: ZooModel) -> bool:
    """Whether the model predicts combinations of seen single perturbations it never saw
    (SAMS-VAE: yes; the sVAE family, one parameter per label: no). Default True."""
    value = _member(model, "composes")
    return True if value is None else bool(value)


def n_latent(model: ZooModel) -> int:
    """The model's latent width per cell (0 when it does not say, e.g. FCR's blocks)."""
    return int(_member(model, "n_latent") or 0)


def likelihood_kind(model: ZooModel) -> str:
    """``"nb"``, ``"zinb"``, ``"poisson"`` or ``"gaussian"``: what the :data:`OBSERVED_SITE` draws are
    (``"gaussian"``: ``log1p(1e4 x / l)``, not counts). Default ``"nb"``."""
    kind = _member(_member(model, "likelihood"), "kind")
    return "nb" if kind is None else str(kind)


def optimizer_settings(model: ZooModel, guide: ZooGuide) -> OptimizerSettings:
    """Learning-rate multipliers of the pair and the model's adversary (see
    :class:`OptimizerSettings`)."""
    multipliers = {**(_member(model, "lr_multipliers") or {}), **(_member(guide, "lr_multipliers") or {})}
    adversary = _member(model, "adversary")
    lr = _member(model, "adversary_lr") if adversary is not None else None
    return OptimizerSettings(multipliers, adversary, None if lr is None else float(lr))


def auxiliary_loss(model: ZooModel) -> Callable[[ZooGuide, Batch], torch.Tensor] | None:
    """``model.auxiliary_loss`` (``(guide, batch) -> Tensor``, added to the negative ELBO
    of each training step, on its scale) or None."""
    return _member(model, "auxiliary_loss")


def training_loss(model: ZooModel) -> Callable[[Any, ZooGuide, Batch], torch.Tensor] | None:
    """``model.training_loss`` (``(elbo, guide, batch) -> Tensor``, differentiated by a
    training step in place of the ELBO's ``differentiable_loss``) or None."""
    return _member(model, "training_loss")


def target_scores(model: ZooModel, guide: ZooGuide) -> TargetScores | None:
    """The pair's :class:`TargetScores` (scores as float64), the guide's when it gives
    any (masks live in guides), else the model's, else None."""
    for owner in (guide, model):
        fn = _member(owner, "target_scores")
        out = fn() if fn is not None else None
        if out is not None:
            if not isinstance(out, TargetScores):
                raise TypeError(f"{type(owner).__name__}.target_scores() must return a TargetScores, got {type(out).__name__}")
            return TargetScores(as_array(out.scores), bool(out.is_mask), list(out.labels))
    return None


def adjacency(model: ZooModel) -> Adjacency | None:
    """The model's learned gene graph (:class:`Adjacency`, weights as float64), or None
    for a model without one."""
    fn = _member(model, "adjacency")
    if fn is None:
        return None
    with torch.no_grad():
        out = fn()
    if not isinstance(out, Adjacency):
        raise TypeError(f"{type(model).__name__}.adjacency() must return an Adjacency, got {type(out).__name__}")
    return Adjacency(as_array(out.weights), bool(out.is_probability), list(out.genes))


def has_adjacency(model: ZooModel | type) -> bool:
    """Whether a model, or a model class before it is built, is a gene-graph model (it
    defines ``adjacency()``). Such a model intervenes on genes: its training data get
    every measured gene as a potential perturbation
    (:func:`pyro_perturb.data.targets.with_gene_perturbations`)."""
    return callable(_member(model, "adjacency"))


def bind_model(model: ZooModel, guide: ZooGuide) -> None:
    """Hand ``model`` to a guide that declares ``bind_model`` (nothing otherwise);
    :func:`pyro_perturb.registry.build` calls it on every pair it builds."""
    fn = _member(guide, "bind_model")
    if fn is not None:
        fn(model)


def mask_probabilities(guide: ZooGuide) -> MaskProbabilities | None:
    """The guide's latent masks ``q(mask = 1)`` with their row labels, or None (a guide
    without masks)."""
    fn = _member(guide, "mask_probabilities")
    if fn is None:
        return None
    with torch.no_grad():
        probs = fn().detach().cpu().numpy()
    return MaskProbabilities(probs, list(guide.mask_labels()))


def cached_posterior(guide: ZooGuide, batch: Batch, differentiable: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{block: (loc, scale)}`` of the guide's posterior on ``batch``: its
    ``cached_posterior`` (reusing the encoders' pass of this step's ELBO) when it has one,
    else its ``posterior(batch)``. For models whose regularisers need the guide's
    posterior (FCR)."""
    fn = _member(guide, "cached_posterior")
    if fn is not None:
        return fn(batch, differentiable=differentiable)
    return guide.posterior(batch)


def basal_sites(model: ZooModel) -> tuple[str, ...]:
    """The model's dosage-independent local sites (see the module docstring); ``()`` when
    it declares none (its local latents then always come from the prior)."""
    return tuple(_member(model, "basal_sites") or ())


def treatment_network_width(guide: ZooGuide) -> int:
    """Width (widest ``Linear`` output) of the guide network run once per treatment and
    particle when globals are sampled (the ATE memory model), 0 when the guide has none."""
    fn = _member(guide, "treatment_network")
    if fn is None:
        return 0
    return max((m.out_features for m in fn().modules() if isinstance(m, nn.Linear)), default=0)


def transfer_parameters(
    model: ZooModel, guide: ZooGuide, label_codes: torch.Tensor, reset: bool = True
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``[(parameter, rows)]`` an out-of-distribution transfer fits for the given label
    codes (model's, then guide's; each re-initialises its rows when ``reset``)."""
    pairs = []
    for module in (model, guide):
        fn = _member(module, "transfer_parameters")
        if fn is not None:
            pairs += fn(label_codes, reset=reset)
    return pairs


def uses_dosage(model: ZooModel) -> bool:
    """Whether the model's counts depend on the dosage (default True); False for a model
    of unperturbed expression such as plain scVI, whose ATE is zero by construction."""
    value = _member(model, "uses_dosage")
    return True if value is None else bool(value)


def init_from_data(model: ZooModel, guide: ZooGuide, data) -> None:
    """Let the model, then the guide, set their data-derived buffers from ``data`` (a
    :class:`~pyro_perturb.data.PerturbationData`, its training split) through their
    ``init_from_data``; nothing for a pair without one."""
    for module in (model, guide):
        fn = _member(module, "init_from_data")
        if fn is not None:
            fn(data)


def latent_blocks(latents: Mapping[str, Any]) -> dict[str, Any]:
    """The named blocks of a ``posterior_latents`` (or ``Run.latents``) output: every
    entry but ``"X_latent"``, keyed without the ``"X_"`` prefix (FCR: ``zx``, ``zt``,
    ``ztx``; SAMS-VAE: ``basal``)."""
    return {k[2:] if k.startswith("X_") else k: v for k, v in latents.items() if k != LATENT_KEY}


# --------------------------------------------------------------------------- checking


def _site_frames(node) -> set[str]:
    return {frame.name for frame in node["cond_indep_stack"]}


def check_pair(model: ZooModel, guide: ZooGuide, batch: Batch) -> None:
    """Check a built pair against the contract on one batch; raises ``TypeError``
    listing every violation. Runs the pair once in eval mode (no training state changes;
    the RNG advances)."""
    problems = []
    for obj, role, proto in ((model, "model", ZooModel), (guide, "guide", ZooGuide)):
        if not isinstance(obj, PyroModule):
            problems.append(f"the {role} is not a PyroModule")
        if not isinstance(obj, proto):
            problems.append(f"the {role} lacks a required member of {proto.__name__}")
    nesting = _member(model, "max_plate_nesting")
    if not isinstance(nesting, int) or nesting < 1:
        problems.append("model.max_plate_nesting must be a positive int")
    model_params = list(inspect.signature(model.forward).parameters)
    guide_params = list(inspect.signature(guide.forward).parameters)
    if model_params != guide_params or model_params[:2] != ["batch", "observe"]:
        problems.append(f"forward signatures differ or are not (batch, observe): model {model_params}, guide {guide_params}")
    if problems:
        raise TypeError("; ".join(problems))

    was = model.training, guide.training
    model.eval()
    guide.eval()
    try:
        with torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
            empty = replace(batch, x=None)
            prior_guide = poutine.trace(guide).get_trace(empty)
            prior_model = poutine.trace(poutine.replay(model, trace=prior_guide)).get_trace(empty, observe=False)
            latents = guide.posterior_latents(batch)
    finally:
        model.train(was[0])
        guide.train(was[1])

    def samples(trace, observed: bool):
        return {name: node for name, node in trace.nodes.items()
                if node["type"] == "sample" and node["is_observed"] == observed and not site_is_subsample(node)}

    x = model_trace.nodes.get(OBSERVED_SITE)
    if x is None or not x["is_observed"]:
        problems.append(f"the model has no observed site {OBSERVED_SITE!r}")
    elif CELL_PLATE not in _site_frames(x):
        problems.append(f"the observed site is not in the plate {CELL_PLATE!r}")
    else:
        frame = next(f for f in x["cond_indep_stack"] if f.name == CELL_PLATE)
        full = frame.size if frame.full_size is None else frame.full_size
        if full != batch.n_cells or frame.size != batch.size:
            problems.append(f"the plate {CELL_PLATE!r} has size {full} (subsample {frame.size}), "
                            f"not batch.n_cells = {batch.n_cells} (batch.size = {batch.size})")
    model_latent, guide_latent = set(samples(model_trace, False)), set(samples(guide_trace, False))
    if model_latent != guide_latent:
        problems.append(f"latent sites differ: model {sorted(model_latent)}, guide {sorted(guide_latent)}")
    local = [name for name, node in samples(prior_guide, False).items() if CELL_PLATE in _site_frames(node)]
    if local:
        problems.append(f"with batch.x = None the guide samples local sites {local}")
    drawn = prior_model.nodes.get(OBSERVED_SITE)
    if drawn is None or drawn["is_observed"]:
        problems.append(f"with observe=False the model does not draw {OBSERVED_SITE!r}")
    if LATENT_KEY not in latents or tuple(latents[LATENT_KEY].shape[:1]) != (batch.size,):
        problems.append(f"posterior_latents must return {LATENT_KEY!r} with one row per cell")
    for name, value in latent_blocks(latents).items():
        if value.shape[0] != batch.size:
            problems.append(f"latent block {name!r} has {value.shape[0]} rows for {batch.size} cells")

    # optional capabilities: the declared shapes
    if not isinstance(composes(model), bool) or not isinstance(n_latent(model), int):
        problems.append("composes must be a bool and n_latent an int")
    settings = optimizer_settings(model, guide)
    if not all(isinstance(k, str) and float(v) > 0 for k, v in settings.lr_multipliers.items()):
        problems.append("lr_multipliers must map parameter-name substrings to positive factors")
    if settings.adversary is not None and (
        not isinstance(settings.adversary, nn.Module) or not callable(_member(model, "adversary_loss"))
    ):
        problems.append("a model's adversary must be an nn.Module, with an adversary_loss(guide, batch)")
    scores = target_scores(model, guide)
    if scores is not None and (scores.scores.ndim != 2 or scores.scores.shape[0] != len(scores.labels)):
        problems.append(f"target_scores: {scores.scores.shape} scores for {len(scores.labels)} labels")
    masks = mask_probabilities(guide)
    if masks is not None and (
        masks.probabilities.ndim != 2 or masks.probabilities.shape[0] != len(masks.labels)
        or not ((masks.probabilities >= 0) & (masks.probabilities <= 1)).all()
    ):
        problems.append(f"mask_probabilities: {masks.probabilities.shape} probabilities for {len(masks.labels)} labels")
    if not isinstance(uses_dosage(model), bool):
        problems.append("uses_dosage must be a bool")
    if not isinstance(treatment_network_width(guide), int):
        problems.append("treatment_network() must return an nn.Module")
    if problems:
        raise TypeError("; ".join(problems))


__all__ = [
    "Adjacency",
    "CELL_PLATE",
    "LATENT_KEY",
    "MaskProbabilities",
    "OBSERVED_SITE",
    "OptimizerSettings",
    "TargetScores",
    "ZooGuide",
    "ZooModel",
    "adjacency",
    "as_array",
    "auxiliary_loss",
    "bind_model",
    "cached_posterior",
    "check_pair",
    "composes",
    "init_from_data",
    "has_adjacency",
    "latent_blocks",
    "likelihood_kind",
    "mask_probabilities",
    "n_latent",
    "optimizer_settings",
    "target_scores",
    "training_loss",
    "transfer_parameters",
    "treatment_network_width",
    "uses_dosage",
]
