"""The SVI engine: one training loop for every registered (model, guide) pair.

Stochastic variational inference on minibatches: the ELBO is Pyro's
(``Trace_ELBO`` or ``TraceMeanField_ELBO``) with vectorised particles, its
``differentiable_loss`` is minimised by a single ``torch.optim.Adam`` over all model
and guide parameters (parameter groups carry per-parameter learning-rate multipliers,
e.g. the SAMS-VAE mask logits), with gradient-norm clipping and weight decay. Minibatch
scaling comes from the models' ``pyro.plate("cells", n, subsample=index)``. KL
annealing is a linear warm-up of ``batch.kl_weight``, which models apply with
``poutine.scale`` to their latent sites.

Each epoch ends with a validation ELBO, early stopping on it (the best state is kept),
an atomic checkpoint, and a row of ``history.csv`` (``val_every_steps`` adds validations
inside long epochs, ``checkpoint_every_steps`` checkpoints). The budget is ``max_epochs``
and, when set, ``max_steps`` optimizer steps (reached mid-epoch, that partial epoch is
validated and logged). The loop's state is one :class:`LoopState`. A run killed at any
point resumes from its last checkpoint, mid-epoch ones included, and ends with the same
parameters as an uninterrupted run.
Under ``torchrun`` the same loop trains data-parallel (:mod:`.distributed`).

Optional hooks a model may define (FCR uses them; :mod:`pyro_perturb.contract`):
* ``model.auxiliary_loss(guide, batch) -> Tensor``: added to the negative ELBO;
* ``model.adversary`` (an ``nn.Module``) and ``model.adversary_loss(guide, batch)``:
  trained by a separate Adam after each main step (adversarial regularisers);
* ``model.training_loss(elbo, guide, batch) -> Tensor``: differentiated in place of the
  ELBO (MO-cVAE's gradient-weighted objectives; single process only).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from .. import contract
from ..data import PerturbationData
from .checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from .distributed import (
    DistContext,
    adversary_optimizer,
    all_reduce_sum,
    data_parallel_loss,
    device_for,
    gather_rng_states,
    particle_seed,
)
from . import distributed

ELBOS = ("trace", "meanfield")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good state was kept."""


@dataclass
class TrainConfig:
    """Training settings (all overridable with ``fit --set key=value``).

    The training budget: ``max_epochs`` passes over the training cells, and, when set,
    ``max_steps`` optimizer steps, whichever comes first; early stopping
    (``early_stopping_patience``) may end training sooner. An epoch is
    ``ceil(n_train / batch_size)`` steps, so an epoch budget is a few hundred steps on a
    small data set and hundreds of thousands on a large one; a step budget is the same
    amount of optimisation whatever the data's size. The registry's training defaults
    are step-based (:mod:`pyro_perturb.registry`).

    Attributes:
        max_epochs: passes over the training cells (with ``max_steps``: a second cap).
        max_steps: optimizer steps, counted over the whole run; training stops when the
            count reaches it, mid-epoch included (that partial epoch is then validated,
            logged and checkpointed as an epoch end is). ``None``: no step cap.
        batch_size: cells per step.
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay.
        clip_norm: gradient-norm clipping (``None``: off).
        num_particles: ELBO particles, vectorised.
        kl_warmup_epochs: epochs of linear KL annealing from ~0 to 1 (0: none). In
            epochs, also under ``max_steps``: on a data set whose epochs are longer than
            ``max_steps / kl_warmup_epochs`` steps the warm-up does not finish.
        early_stopping_patience: validations without improvement before stopping
            (``None``: never stop early): epochs, unless ``val_every_steps`` adds
            validations inside long epochs, which count too.
        val_every_steps: also validate every this many optimizer steps inside an epoch
            (counted from the epoch's start; the epoch's end is validated as always), so
            that a data set whose epoch is long, or longer than the whole ``max_steps``
            budget, still keeps its best state and stops early. Each such validation adds
            a row to the history (its ``epoch`` is the epoch in progress, its
            ``train_loss`` the mean over that epoch's steps so far) and a checkpoint.
            Epochs of at most this many steps are unaffected. ``None``: once per epoch.
        min_delta: improvement (per cell) that counts.
        elbo: ``"trace"`` (Monte Carlo KL) or ``"meanfield"`` (analytic KL where
            available).
        lr_multipliers: ``{substring: factor}``: parameters whose name contains the
            substring train at ``lr * factor`` (merged with the model's own).
        seed: seeds parameters, particles, batch order and the random split.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        eval_batch_size: cells per validation batch.
        progress: show a progress bar.
        shuffle_block_size: ``None``: each epoch visits the training cells in a uniform
            random order. A number: *block-shuffling* (see
            :func:`~pyro_perturb.data.epoch_order`), blocks of that many consecutive
            cells in random order, shuffled within windows of ``shuffle_buffer_blocks``
            blocks: minibatches are then read from disk as a few contiguous slices
            (backed ``.h5ad``), at the price of correlated cells within a batch.
        shuffle_buffer_blocks: blocks per shuffling window (with ``shuffle_block_size``).
        checkpoint_every_steps: also checkpoint every this many optimizer steps inside an
            epoch (with a run directory); a resumed run continues at that step and ends
            as an uninterrupted one. ``None``: at the end of each epoch only.
        validate_distributions: run Pyro's distribution argument and support checks in
            training steps. Off by default: they cost ~5-10% of a SAMS-VAE step
            (bench/results/train_throughput.md), counts are checked when the data are
            loaded, and a NaN parameter still stops training (``TrainingDivergedError``
            from the non-finite loss). Also for the per-epoch validation loss; evaluation
            (``iwelbo``: always off; ATE, predictive) is not affected.
    """

    max_epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6
    clip_norm: float | None = 10.0
    num_particles: int = 1
    kl_warmup_epochs: int = 0
    early_stopping_patience: int | None = 20
    min_delta: float = 0.0
    elbo: str = "trace"
    lr_multipliers: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 1024
    progress: bool = False
    shuffle_block_size: int | None = None
    shuffle_buffer_blocks: int = 16
    checkpoint_every_steps: int | None = None
    validate_distributions: bool = False
    val_every_steps: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be None or >= 1, got {self.max_steps}"),
            (self.val_every_steps is None or self.val_every_steps >= 1,
             f"val_every_steps must be None or >= 1, got {self.val_every_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.num_particles >= 1, f"num_particles must be >= 1, got {self.num_particles}"),
            (self.elbo in ELBOS, f"elbo must be one of {ELBOS}, got {self.elbo!r}"),
            (self.shuffle_block_size is None or self.shuffle_block_size >= 1,
             f"shuffle_block_size must be None or >= 1, got {self.shuffle_block_size}"),
            (self.shuffle_buffer_blocks >= 1, f"shuffle_buffer_blocks must be >= 1, got {self.shuffle_buffer_blocks}"),
            (self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
             f"checkpoint_every_steps must be None or >= 1, got {self.checkpoint_every_steps}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu or cuda, got {self.device!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def make_elbo(kind: str, num_particles: int, max_plate_nesting: int):
    cls = TraceMeanField_ELBO if kind == "meanfield" else Trace_ELBO
    return cls(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=max_plate_nesting,
    )


def kl_weight_at(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up; never exactly 0 (``poutine.scale(scale=0)`` is refused)."""
    if warmup_epochs <= 0:
        return 1.0
    return float(min(1.0, max(1e-3, (epoch + 1) / (warmup_epochs + 1))))


def _param_groups(modules, cfg: TrainConfig, multipliers: dict, exclude: set[int]):
    groups: dict[float, list] = {}
    seen: set[int] = set()
    for module in modules:
        for name, p in module.named_parameters():
            if id(p) in seen or id(p) in exclude or not p.requires_grad:
                continue
            seen.add(id(p))
            factor = 1.0
            for key, f in multipliers.items():
                if key in name:
                    factor = float(f)
            groups.setdefault(factor, []).append(p)
    return [{"params": ps, "lr": cfg.lr * f} for f, ps in sorted(groups.items())]


def optimizer_params(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def distribution_checks(enabled: bool):
    """Context: Pyro's distribution checks as they are when ``enabled`` (a user who
    switched them off globally keeps them off), off otherwise."""
    return contextlib.nullcontext() if enabled else pyro.validation_enabled(False)


def training_step(
    model, guide, batch, elbo, optimizer, clip_norm=None, aux=None, adversary_optimizer=None,
    validate_distributions: bool = True, loss_fn: Callable | None = None,
) -> torch.Tensor:
    """One SVI step of :func:`train`: ``elbo.differentiable_loss`` (+ the model's
    auxiliary loss), backward, gradient clipping, ``optimizer.step()``, then the
    adversary's step if any. Returns the detached loss; when it is not finite nothing
    is updated (the caller stops). ``validate_distributions=False`` switches Pyro's
    distribution checks off for the step (``TrainConfig.validate_distributions``).
    ``loss_fn(elbo, guide, batch)``: the model's :func:`~pyro_perturb.contract.training_loss`,
    differentiated in place of ``elbo.differentiable_loss(model, guide, batch)``.
    ``bench/train_throughput.py`` times this function.
    """
    try:
        with distribution_checks(validate_distributions):
            if loss_fn is None:
                loss = elbo.differentiable_loss(model, guide, batch)
            else:
                loss = loss_fn(elbo, guide, batch)
            if aux is not None:
                loss = loss + aux(guide, batch)
    except ValueError:
        # distribution argument checks fail on NaN parameters: that is divergence
        if all(torch.isfinite(p).all() for p in optimizer_params(optimizer)):
            raise
        return torch.tensor(float("nan"))
    if not torch.isfinite(loss):
        return loss.detach()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), clip_norm)
    optimizer.step()
    if adversary_optimizer is not None:
        with distribution_checks(validate_distributions):
            adv_loss = model.adversary_loss(guide, batch)
        adversary_optimizer.zero_grad(set_to_none=True)
        adv_loss.backward()
        adversary_optimizer.step()
    return loss.detach()


def _state(model, guide) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "guide": copy.deepcopy(guide.state_dict())}


@torch.no_grad()
def validation_loss(
    model, guide, data: PerturbationData, split: str, cfg: TrainConfig, device, seed: int, ctx: DistContext | None = None
) -> float:
    """Negative ELBO per cell over a split (globals counted once), seeded.

    Data-parallel (``ctx``): each rank evaluates a contiguous share of the cells (plate
    size: the whole split) and the sums are added across ranks."""
    idx = data.indices(split)
    if len(idx) == 0:
        return float("nan")
    ctx = ctx or DistContext()
    positions = np.array_split(np.arange(len(idx)), ctx.world_size)[ctx.rank]
    elbo = make_elbo(cfg.elbo, cfg.num_particles, model.max_plate_nesting)
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pyro.set_rng_seed(seed)
        for start in range(0, len(positions), cfg.eval_batch_size):
            pos = positions[start : start + cfg.eval_batch_size]
            batch = data.batch(idx[pos], n_cells=len(idx), positions=pos, device=device)
            # the plate scales the batch's local terms by n / B; weighting by B / n
            # makes the sum over batches count the global terms exactly once
            with distribution_checks(cfg.validate_distributions):
                loss = elbo.loss(model, guide, batch)
            total += float(loss) * batch.size / batch.n_cells
    (total,) = all_reduce_sum([total], ctx, device)
    return total / len(idx)


HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "kl_weight", "seconds", "step"]


@dataclass
class LoopState:
    """Where a run of :func:`train` stands: what the loop carries from step to step, and
    what its checkpoints save of it (beside the modules, optimizers and RNG states).

    Attributes:
        epoch: completed epochs.
        step: optimizer steps done inside epoch ``epoch`` (0 at an epoch boundary; a
            mid-epoch checkpoint resumes there).
        global_step: optimizer steps since training began (``max_steps`` caps it).
        running: sum over the epoch's steps so far of the per-cell training loss (this
            process's; restored from a checkpoint: the mean over the processes).
        epoch_seconds: seconds spent in epoch ``epoch`` before its mid-epoch checkpoint.
        best_val: the lowest validation loss so far.
        bad_epochs: validations in a row without improvement (epochs, unless
            ``val_every_steps`` adds some); early stopping compares it to the patience.
        best: ``{"model": state_dict, "guide": state_dict}`` at ``best_val`` (``None``
            before the first improvement).
        history: one row per validation, keys :data:`HISTORY_FIELDS`.
        stopped_early: early stopping ended the run.
        last_good: the modules' state after the last validation (or where training
            started), restored when the loss diverges; not checkpointed.
        last_good_at: where ``last_good`` was taken, for the divergence message.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    running: float = 0.0
    epoch_seconds: float = 0.0
    best_val: float = math.inf
    bad_epochs: int = 0
    best: dict | None = None
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    last_good: dict | None = None
    last_good_at: str = "after epoch 0"

    def budget_spent(self, cfg: TrainConfig) -> bool:
        """Early stopping or ``max_steps`` ended training (``max_epochs``: the caller's loop)."""
        return self.stopped_early or (cfg.max_steps is not None and self.global_step >= cfg.max_steps)

    def checkpoint_entries(self, running: float, epoch_seconds: float) -> dict:
        """The loop's part of a checkpoint; ``running``: the epoch's loss sum so far,
        averaged over the processes (0 at an epoch boundary)."""
        return {
            "epoch": self.epoch,
            "step": int(self.step),
            "global_step": int(self.global_step),
            "running": float(running),
            "epoch_seconds": float(epoch_seconds),
            "best_val": float(self.best_val),
            "bad_epochs": int(self.bad_epochs),
            "history": [dict(r) for r in self.history],
            "stopped_early": bool(self.stopped_early),
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict, steps_per_epoch: int) -> "LoopState":
        """The state a checkpoint saved. Checkpoints written before step counts were kept
        (no ``global_step``, rows without ``step``) ended every epoch they logged, so
        their step counts follow from the epochs."""
        epoch, step = ckpt["epoch"], int(ckpt.get("step", 0))
        history = [dict(r) for r in ckpt["history"]]
        for row in history:
            row.setdefault("step", int(row["epoch"]) * steps_per_epoch)
        global_step = int(ckpt.get("global_step", epoch * steps_per_epoch + step))
        return cls(
            epoch=epoch,
            step=step,
            global_step=global_step,
            running=float(ckpt.get("running", 0.0)),
            epoch_seconds=float(ckpt.get("epoch_seconds", 0.0)),
            best_val=ckpt["best_val"],
            bad_epochs=ckpt["bad_epochs"],
            best={"model": ckpt["best_model"], "guide": ckpt["best_guide"]},
            history=history,
            stopped_early=bool(ckpt.get("stopped_early", False)),
            last_good_at=f"at step {global_step}" if step else f"after epoch {epoch}",
        )


@dataclass
class _Trainer:
    """What stays fixed while :func:`train` runs: modules, optimizers, data, settings."""

    model: torch.nn.Module
    guide: torch.nn.Module
    data: PerturbationData
    cfg: TrainConfig
    ctx: DistContext
    device: torch.device
    optimizer: torch.optim.Optimizer
    adv_optimizer: object | None
    step_elbo: object  # what training_step differentiates (see data_parallel_loss)
    step_aux: Callable | None
    run_dir: Path | None
    callback: Callable[[int, dict], None] | None
    n_train: int
    has_val: bool
    steps_per_epoch: int
    progress: object | None = None  # tqdm bar over epochs (rank 0, cfg.progress)
    step_loss: Callable | None = None  # the model's training_loss (contract), if any


def train(
    model,
    guide,
    data: PerturbationData,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` and ``guide`` in place; return the history (one dict per
    validation: each epoch's end, plus every ``cfg.val_every_steps`` steps inside long
    epochs, plus where ``cfg.max_steps`` stops training mid-epoch; keys
    :data:`HISTORY_FIELDS`, ``step`` being the optimizer steps done so far).

    With ``run_dir``, a checkpoint is written atomically after every validation (and
    every ``cfg.checkpoint_every_steps`` steps) and ``history.csv`` kept up to date;
    ``resume=True`` continues from the checkpoint. At the end the best state (lowest
    validation loss) is loaded into the modules. ``callback(epoch, row)`` runs after
    each row's checkpoint (``epoch``: ``row["epoch"]``, the epoch the row belongs to).

    When a ``torch.distributed`` process group is initialised (``torchrun``), training
    is data-parallel (see :mod:`pyro_perturb.infer.distributed`): each process trains
    on its share of every batch of ``cfg.batch_size`` cells, gradients are averaged,
    and only rank 0 writes to ``run_dir``.
    """
    ctx = distributed.current()
    device = device_for(ctx, resolve_device(cfg.device))
    model.to(device)
    guide.to(device)
    pyro.set_rng_seed(particle_seed(cfg.seed, ctx))
    pyro.clear_param_store()
    n_train = len(data.indices("train"))
    if n_train == 0:
        raise ValueError("the training split is empty: no cell has split 'train'")
    has_val = len(data.indices("val")) > 0

    settings = contract.optimizer_settings(model, guide)
    adversary = settings.adversary
    adversary_params = set(id(p) for p in adversary.parameters()) if adversary is not None else set()
    multipliers = {**settings.lr_multipliers, **cfg.lr_multipliers}
    optimizer = torch.optim.Adam(
        _param_groups([model, guide], cfg, multipliers, adversary_params), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    adv_optimizer = (
        torch.optim.Adam(adversary.parameters(), lr=cfg.lr if settings.adversary_lr is None else settings.adversary_lr)
        if adversary is not None
        else None
    )
    adv_optimizer = adversary_optimizer(adv_optimizer, ctx)
    elbo = make_elbo(cfg.elbo, cfg.num_particles, model.max_plate_nesting)
    aux = contract.auxiliary_loss(model)
    custom_loss = contract.training_loss(model)
    if custom_loss is not None and ctx.is_distributed:
        raise ValueError(f"{type(model).__name__} defines its own training_loss, which data-parallel training does not support")

    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs a run directory")
        state = _resume(Path(run_dir), model, guide, optimizer, adv_optimizer, ctx, steps_per_epoch)
    else:
        state = LoopState()
    state.last_good = _state(model, guide)
    # what training_step differentiates: the ELBO (+ aux) itself in one process; when
    # distributed, the same loss computed through DistributedDataParallel (gradients
    # averaged across ranks in backward)
    step_elbo, step_aux = data_parallel_loss(model, guide, elbo, aux, ctx)
    trainer = _Trainer(
        model, guide, data, cfg, ctx, device, optimizer, adv_optimizer, step_elbo, step_aux,
        Path(run_dir) if run_dir is not None else None, callback, n_train, has_val, steps_per_epoch,
        step_loss=custom_loss,
    )
    if cfg.progress and ctx.is_main:
        from tqdm.auto import tqdm

        trainer.progress = tqdm(initial=state.epoch, total=cfg.max_epochs, desc="epochs", unit="ep")
    while state.epoch < cfg.max_epochs and not state.budget_spent(cfg):
        _train_epoch(trainer, state)
    if trainer.progress is not None:
        trainer.progress.close()
    if state.best is not None:
        model.load_state_dict(state.best["model"])
        guide.load_state_dict(state.best["guide"])
    return state.history


def _resume(run_dir: Path, model, guide, optimizer, adv_optimizer, ctx: DistContext, steps_per_epoch: int) -> LoopState:
    """Load the checkpoint in ``run_dir`` into the modules, optimizers and this
    process's RNG; return the loop state it saved."""
    ckpt = load_checkpoint(run_dir)
    model.load_state_dict(ckpt["model"])
    guide.load_state_dict(ckpt["guide"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if adv_optimizer is not None and "adversary_optimizer" in ckpt:
        adv_optimizer.load_state_dict(ckpt["adversary_optimizer"])
    rng_states = ckpt.get("rng_torch_ranks", [ckpt["rng_torch"]])
    if len(rng_states) != ctx.world_size:
        raise ValueError(
            f"the checkpoint in {run_dir} was written by {len(rng_states)} training process(es); "
            f"resume it with as many (this run has {ctx.world_size})"
        )
    torch.set_rng_state(rng_states[ctx.rank])
    return LoopState.from_checkpoint(ckpt, steps_per_epoch)


def _train_epoch(t: _Trainer, state: LoopState) -> None:
    """Train epoch ``state.epoch`` from step ``state.step`` (a mid-epoch checkpoint
    resumes inside its epoch) to its end, or until a mid-epoch validation ends
    training (``max_steps`` reached, early stopping)."""
    cfg, ctx = t.cfg, t.ctx
    epoch, first_step = state.epoch, state.step
    # resumed mid-epoch: the epoch's loss sum (state.running) and time so far go on
    t0 = time.perf_counter() - (state.epoch_seconds if first_step else 0.0)
    if not first_step:
        state.running = 0.0
    kl_weight = kl_weight_at(epoch, cfg.kl_warmup_epochs)
    t.model.train()
    t.guide.train()
    for batch in t.data.batches(
        "train", cfg.batch_size, shuffle=True, seed=cfg.seed * 1_000_003 + epoch, device=t.device,
        block_size=cfg.shuffle_block_size, buffer_blocks=cfg.shuffle_buffer_blocks, shard=ctx.shard,
        start_step=first_step,
    ):
        batch = batch.with_kl_weight(kl_weight)
        loss = training_step(t.model, t.guide, batch, t.step_elbo, t.optimizer, cfg.clip_norm, t.step_aux,
                             t.adv_optimizer, validate_distributions=cfg.validate_distributions,
                             loss_fn=t.step_loss)
        if not torch.isfinite(loss):
            t.model.load_state_dict(state.last_good["model"])
            t.guide.load_state_dict(state.last_good["guide"])
            raise TrainingDivergedError(
                f"the loss became {float(loss)} at epoch {epoch + 1}, step {state.step + 1}; "
                f"training stopped and the last good state ({state.last_good_at}) was kept"
                + (f" in {t.run_dir}" if t.run_dir else "")
                + ". Try a lower learning rate (--lr) or gradient clipping (--set clip_norm=1)"
            )
        state.running += float(loss) / t.n_train
        state.step += 1
        state.global_step += 1
        if state.step >= t.steps_per_epoch:
            continue  # the epoch's last step: validated below
        budget_reached = cfg.max_steps is not None and state.global_step >= cfg.max_steps
        if budget_reached or (cfg.val_every_steps and state.step % cfg.val_every_steps == 0):
            _validate(t, state, kl_weight, t0, epoch_done=False)
            if state.budget_spent(cfg):
                return
            t.model.train()
            t.guide.train()
        elif t.run_dir is not None and cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
            (mean_running,) = all_reduce_sum([state.running / ctx.world_size], ctx, t.device)
            _checkpoint(t, state, mean_running, time.perf_counter() - t0)
    _validate(t, state, kl_weight, t0, epoch_done=True)


def _validate(t: _Trainer, state: LoopState, kl_weight: float, t0: float, epoch_done: bool) -> None:
    """Validation at the end of an epoch (``epoch_done``) or inside it: a history row,
    early stopping, a checkpoint, the progress bar and the callback."""
    cfg, ctx = t.cfg, t.ctx
    # the ranks' losses are estimates of the same batch loss: average them
    (running,) = all_reduce_sum([state.running / ctx.world_size], ctx, t.device)
    t.model.eval()
    t.guide.eval()
    val = (
        validation_loss(t.model, t.guide, t.data, "val", cfg, t.device, seed=cfg.seed + 7919, ctx=ctx)
        if t.has_val
        else running / state.step
    )
    row = {
        "epoch": state.epoch + 1,
        "train_loss": running / state.step,
        "val_loss": val,
        "kl_weight": kl_weight,
        "seconds": time.perf_counter() - t0,
        "step": state.global_step,
    }
    state.history.append(row)
    # early stopping on the validation loss; warm-up epochs never count as "bad"
    if math.isfinite(val) and val < state.best_val - cfg.min_delta:
        state.best_val, state.bad_epochs, state.best = val, 0, _state(t.model, t.guide)
    elif state.epoch >= cfg.kl_warmup_epochs:
        state.bad_epochs += 1
    if cfg.early_stopping_patience is not None and state.bad_epochs >= cfg.early_stopping_patience:
        state.stopped_early = True
    state.last_good = _state(t.model, t.guide)
    if epoch_done:
        state.epoch, state.step, state.running = state.epoch + 1, 0, 0.0
        state.last_good_at = f"after epoch {state.epoch}"
        _checkpoint(t, state)
    else:
        state.last_good_at = f"at step {state.global_step}"
        _checkpoint(t, state, running, time.perf_counter() - t0)
    if t.progress is not None:
        t.progress.set_postfix(loss=f"{row['train_loss']:.4g}", val=f"{val:.4g}")
        if epoch_done:
            t.progress.update(1)
    if t.callback is not None and ctx.is_main:
        t.callback(row["epoch"], row)


def _checkpoint(t: _Trainer, state: LoopState, running: float = 0.0, epoch_seconds: float = 0.0) -> None:
    """Checkpoint ``state`` (with a run directory). Collective: every rank hands over
    its RNG state, rank 0 writes."""
    if t.run_dir is None:
        return
    rng_states = gather_rng_states(t.ctx)
    if t.ctx.is_main:
        _write_checkpoint(t.run_dir, t.model, t.guide, t.optimizer, t.adv_optimizer, state, rng_states, running,
                          epoch_seconds)


def _write_checkpoint(run_dir, model, guide, optimizer, adv_optimizer, state: LoopState, rng_states, running=0.0,
                      epoch_seconds=0.0):
    """``state.epoch`` completed epochs, plus ``state.step`` optimizer steps of the next
    one (with its summed loss so far, ``running``) for a mid-epoch checkpoint;
    ``rng_states``: the torch RNG state of every training process, by rank."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    best = state.best
    checkpoint = {
        **state.checkpoint_entries(running, epoch_seconds),
        "rng_torch_ranks": list(rng_states),
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_torch": rng_states[0],
        "best_model": best["model"] if best else model.state_dict(),
        "best_guide": best["guide"] if best else guide.state_dict(),
    }
    if adv_optimizer is not None:
        checkpoint["adversary_optimizer"] = adv_optimizer.state_dict()
    save_checkpoint(checkpoint, run_dir)
    write_history(state.history, run_dir / "history.csv")


def write_history(history: list[dict], path: Path) -> None:
    """``history.csv``: one line per row, columns :data:`HISTORY_FIELDS` (a value a row
    lacks, e.g. ``step`` in a history written before steps were logged, is left empty)."""
    def write(f):
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        for r in history:
            w.writerow({k: _history_cell(k, r.get(k)) for k in HISTORY_FIELDS})
        f.write(buf.getvalue().encode())

    atomic_write_bytes(Path(path), write)


def _history_cell(key: str, value):
    """A ``history.csv`` cell. ``epoch`` and ``step`` are integers; a history read back
    by pandas holds them as floats, and a missing ``step`` (a history written before
    steps were logged) as NaN, written as an empty cell."""
    if key in ("epoch", "step"):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return int(value)
    return value
