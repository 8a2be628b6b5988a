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
an atomic checkpoint, and a row of ``history.csv``. A run killed at any point resumes
from its last checkpoint and ends with the same parameters as an uninterrupted run.

Optional hooks a model may define (FCR uses them):
* ``model.auxiliary_loss(guide, batch) -> Tensor``: added to the negative ELBO;
* ``model.adversary`` (an ``nn.Module``) and ``model.adversary_loss(guide, batch)``:
  trained by a separate Adam after each main step (adversarial regularisers).
"""

from __future__ import annotations

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

from ..data import PerturbationData
from .checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint

ELBOS = ("trace", "meanfield")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good state was kept."""


@dataclass
class TrainConfig:
    """Training settings (all overridable with ``fit --set key=value``).

    Attributes:
        max_epochs: passes over the training cells.
        batch_size: cells per step.
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay.
        clip_norm: gradient-norm clipping (``None``: off).
        num_particles: ELBO particles, vectorised.
        kl_warmup_epochs: epochs of linear KL annealing from ~0 to 1 (0: none).
        early_stopping_patience: epochs without validation improvement before stopping
            (``None``: never stop early).
        min_delta: improvement (per cell) that counts.
        elbo: ``"trace"`` (Monte Carlo KL) or ``"meanfield"`` (analytic KL where
            available).
        lr_multipliers: ``{substring: factor}``: parameters whose name contains the
            substring train at ``lr * factor`` (merged with the model's own).
        seed: seeds parameters, particles, batch order and the random split.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        eval_batch_size: cells per validation batch.
        progress: show a progress bar.
    """

    max_epochs: int = 100
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

    def __post_init__(self) -> None:
        checks = [
            (self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.num_particles >= 1, f"num_particles must be >= 1, got {self.num_particles}"),
            (self.elbo in ELBOS, f"elbo must be one of {ELBOS}, got {self.elbo!r}"),
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


def _state(model, guide) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "guide": copy.deepcopy(guide.state_dict())}


@torch.no_grad()
def validation_loss(model, guide, data: PerturbationData, split: str, cfg: TrainConfig, device, seed: int) -> float:
    """Negative ELBO per cell over a split (globals counted once), seeded."""
    idx = data.indices(split)
    if len(idx) == 0:
        return float("nan")
    elbo = make_elbo(cfg.elbo, cfg.num_particles, model.max_plate_nesting)
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pyro.set_rng_seed(seed)
        for batch in data.batches(split, cfg.eval_batch_size, device=device):
            # the plate scales the batch's local terms by n / B; weighting by B / n
            # makes the sum over batches count the global terms exactly once
            total += float(elbo.loss(model, guide, batch)) * batch.size / batch.n_cells
    return total / len(idx)


HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "kl_weight", "seconds"]


def train(
    model,
    guide,
    data: PerturbationData,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` and ``guide`` in place; return the history (one dict per epoch).

    With ``run_dir``, a checkpoint is written atomically after every epoch and
    ``history.csv`` kept up to date; ``resume=True`` continues from the checkpoint.
    At the end the best state (lowest validation loss) is loaded into the modules.
    ``callback(epoch, row)`` runs after each epoch's checkpoint.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    guide.to(device)
    pyro.set_rng_seed(cfg.seed)
    pyro.clear_param_store()
    n_train = len(data.indices("train"))
    if n_train == 0:
        raise ValueError("the training split is empty: no cell has split 'train'")
    has_val = len(data.indices("val")) > 0

    adversary = getattr(model, "adversary", None)
    adversary_params = set(id(p) for p in adversary.parameters()) if adversary is not None else set()
    multipliers = {**getattr(model, "lr_multipliers", {}), **getattr(guide, "lr_multipliers", {}), **cfg.lr_multipliers}
    optimizer = torch.optim.Adam(
        _param_groups([model, guide], cfg, multipliers, adversary_params), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    adv_optimizer = (
        torch.optim.Adam(adversary.parameters(), lr=getattr(model, "adversary_lr", cfg.lr))
        if adversary is not None
        else None
    )
    elbo = make_elbo(cfg.elbo, cfg.num_particles, model.max_plate_nesting)
    aux = getattr(model, "auxiliary_loss", None)

    history: list[dict] = []
    start_epoch, best_val, bad_epochs, best, stopped_early = 0, math.inf, 0, None, False
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs a run directory")
        ckpt = load_checkpoint(Path(run_dir))
        model.load_state_dict(ckpt["model"])
        guide.load_state_dict(ckpt["guide"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if adv_optimizer is not None and "adversary_optimizer" in ckpt:
            adv_optimizer.load_state_dict(ckpt["adversary_optimizer"])
        torch.set_rng_state(ckpt["rng_torch"])
        start_epoch, best_val, bad_epochs = ckpt["epoch"], ckpt["best_val"], ckpt["bad_epochs"]
        best = {"model": ckpt["best_model"], "guide": ckpt["best_guide"]}
        history = [dict(r) for r in ckpt["history"]]
        stopped_early = bool(ckpt.get("stopped_early", False))
    last_good = _state(model, guide)

    epochs = range(start_epoch, cfg.max_epochs)
    if cfg.progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, initial=start_epoch, total=cfg.max_epochs, desc="epochs", unit="ep")
    for epoch in epochs:
        if stopped_early:
            break
        t0 = time.perf_counter()
        kl_weight = kl_weight_at(epoch, cfg.kl_warmup_epochs)
        model.train()
        guide.train()
        running, n_steps = 0.0, 0
        for step, batch in enumerate(
            data.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed * 1_000_003 + epoch, device=device)
        ):
            batch = batch.with_kl_weight(kl_weight)
            try:
                loss = elbo.differentiable_loss(model, guide, batch)
                if aux is not None:
                    loss = loss + aux(guide, batch)
            except ValueError:
                # distribution argument checks fail on NaN parameters: that is divergence
                if all(torch.isfinite(p).all() for p in optimizer_params(optimizer)):
                    raise
                loss = torch.tensor(float("nan"))
            if not torch.isfinite(loss):
                model.load_state_dict(last_good["model"])
                guide.load_state_dict(last_good["guide"])
                raise TrainingDivergedError(
                    f"the loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                    f"training stopped and the last good state (after epoch {epoch}) was kept"
                    + (f" in {run_dir}" if run_dir else "")
                    + ". Try a lower learning rate (--lr) or gradient clipping (--set clip_norm=1)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_norm:
                torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), cfg.clip_norm)
            optimizer.step()
            if adv_optimizer is not None:
                adv_loss = model.adversary_loss(guide, batch)
                adv_optimizer.zero_grad(set_to_none=True)
                adv_loss.backward()
                adv_optimizer.step()
            running += float(loss.detach()) / n_train
            n_steps += 1
        model.eval()
        guide.eval()
        val = (
            validation_loss(model, guide, data, "val", cfg, device, seed=cfg.seed + 7919)
            if has_val
            else running / n_steps
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": running / n_steps,
            "val_loss": val,
            "kl_weight": kl_weight,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        # early stopping on the validation loss; warm-up epochs never count as "bad"
        if math.isfinite(val) and val < best_val - cfg.min_delta:
            best_val, bad_epochs, best = val, 0, _state(model, guide)
        elif epoch >= cfg.kl_warmup_epochs:
            bad_epochs += 1
        if cfg.early_stopping_patience is not None and bad_epochs >= cfg.early_stopping_patience:
            stopped_early = True
        last_good = _state(model, guide)
        if run_dir is not None:
            _write_checkpoint(run_dir, model, guide, optimizer, adv_optimizer, epoch + 1, best_val, bad_epochs, best, history, stopped_early)
        if cfg.progress:
            epochs.set_postfix(loss=f"{row['train_loss']:.4g}", val=f"{val:.4g}")
        if callback is not None:
            callback(epoch + 1, row)
    if best is not None:
        model.load_state_dict(best["model"])
        guide.load_state_dict(best["guide"])
    return history


def _write_checkpoint(run_dir, model, guide, optimizer, adv_optimizer, epoch, best_val, bad_epochs, best, history, stopped_early):
    run_dir = Path(run_dir)
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "best_val": float(best_val),
        "bad_epochs": int(bad_epochs),
        "best_model": best["model"] if best else model.state_dict(),
        "best_guide": best["guide"] if best else guide.state_dict(),
        "history": [dict(r) for r in history],
        "stopped_early": bool(stopped_early),
    }
    if adv_optimizer is not None:
        state["adversary_optimizer"] = adv_optimizer.state_dict()
    save_checkpoint(state, run_dir)
    write_history(history, run_dir / "history.csv")


def write_history(history: list[dict], path: Path) -> None:
    def write(f):
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        for r in history:
            w.writerow({k: r[k] for k in HISTORY_FIELDS})
        f.write(buf.getvalue().encode())

    atomic_write_bytes(Path(path), write)
