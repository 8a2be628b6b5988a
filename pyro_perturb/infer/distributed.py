"""Data-parallel training with ``torch.distributed`` (one process per device).

Launch ``pyro-perturb fit`` (or any script calling :func:`pyro_perturb.fit`) with
``torchrun``; the engine notices the process group and trains data-parallel::

    torchrun --nproc_per_node=4 -m pyro_perturb.cli fit --model cvae --data d.h5ad --out run

How it works (see :func:`pyro_perturb.infer.engine.train`):

* :func:`init_from_env` starts the process group from torchrun's environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...): NCCL with one GPU
  per process (``cuda:LOCAL_RANK``) when CUDA is there and the device is not ``cpu``,
  gloo on CPU.
* Every rank draws the same shuffled order of the training cells each epoch (same
  seed) and keeps its own contiguous share of every batch of ``batch_size`` cells
  (``batch_size`` stays the *total* batch size; each rank takes
  ``batch_size / world_size``). The ``"cells"`` plate keeps the size of the whole
  training split, so each rank's loss is an unbiased ELBO estimate, and the mean of
  the ranks' losses is the single-process loss of the whole batch.
* The loss is computed inside :class:`LossModule` wrapped in
  :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients of
  every model and guide parameter across ranks during ``backward``; with identical
  initial parameters (DDP broadcasts rank 0's) and identical averaged gradients, every
  rank's Adam takes the same step, so parameters stay identical.
* Particle noise differs per rank (the torch RNG is seeded with ``seed + rank``-derived
  values) but is deterministic; checkpoints store every rank's RNG state.
* Only rank 0 writes checkpoints, history and the run directory; the validation loss
  is summed over the ranks' shards of the validation cells.
* A model with an adversary (FCR's permutation discriminator) keeps its second
  optimiser; :class:`AveragedGradientOptimizer` averages the adversary's gradients
  across ranks before each of its steps, so the discriminator stays identical too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in data-parallel training (world_size 1: alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` for :meth:`PerturbationData.batches`, ``None`` alone."""
        return (self.rank, self.world_size) if self.is_distributed else None


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set up a multi-process environment."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> DistContext:
    """Start the default process group from the launcher's environment variables.

    NCCL when CUDA is available and ``device`` is not ``"cpu"`` (and this process then
    uses ``cuda:LOCAL_RANK``), gloo otherwise. Returns the context; a no-op returning
    the current context when the group already exists, and a single-process context
    when no launcher set ``WORLD_SIZE`` > 1.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return DistContext()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return current()


def current() -> DistContext:
    """The context of the initialised process group (single-process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1))),
    )


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when training on CUDA with NCCL."""
    if ctx.is_distributed and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def particle_seed(seed: int, ctx: DistContext) -> int:
    """Seed of the particle noise of one rank: distinct per rank, fixed by ``seed``."""
    return seed + 104_729 * ctx.rank


class LossModule(torch.nn.Module):
    """``forward(batch)`` is the training loss of ``(model, guide)`` on one minibatch:
    the negative ELBO (``elbo.differentiable_loss``) plus the model's auxiliary loss.

    Holding model and guide as submodules makes their parameters the module's, so that
    :class:`~torch.nn.parallel.DistributedDataParallel` can average their gradients.
    """

    def __init__(self, model, guide, elbo, auxiliary_loss=None) -> None:
        super().__init__()
        self.model = model
        self.guide = guide
        self.elbo = elbo
        self.auxiliary_loss = auxiliary_loss

    def forward(self, batch) -> torch.Tensor:
        loss = self.elbo.differentiable_loss(self.model, self.guide, batch)
        if self.auxiliary_loss is not None:
            loss = loss + self.auxiliary_loss(self.guide, batch)
        return loss


class DataParallelLoss:
    """The training loss through :class:`~torch.nn.parallel.DistributedDataParallel`,
    with the ``differentiable_loss(model, guide, batch)`` interface of a Pyro ELBO, so
    the engine's training step uses it unchanged.

    ``backward`` of the returned loss averages the gradients of every model and guide
    parameter across ranks. A loss that is not finite on one rank is made non-finite
    on every rank (one small all-reduce per step), so that all ranks stop together
    instead of waiting for each other's gradients.
    """

    def __init__(self, module: LossModule) -> None:
        # find_unused_parameters: some parameters (e.g. of labels absent from a batch, or
        # used only at prediction time) get no gradient in a step; DDP must not wait for them
        self.ddp = torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    def differentiable_loss(self, model, guide, batch) -> torch.Tensor:
        loss = self.ddp(batch)
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite.item()):
            return loss.detach() * float("nan")
        return loss


def data_parallel_loss(model, guide, elbo, auxiliary_loss, ctx: DistContext):
    """``(elbo, auxiliary_loss)`` for the engine's training step: unchanged in one
    process; when distributed, a :class:`DataParallelLoss` (that includes the auxiliary
    loss) and ``None``."""
    if not ctx.is_distributed:
        return elbo, auxiliary_loss
    return DataParallelLoss(LossModule(model, guide, elbo, auxiliary_loss)), None


class AveragedGradientOptimizer:
    """An optimiser whose ``step`` first averages its parameters' gradients over the
    ranks (one all-reduce per parameter): for a second optimiser that trains outside
    DistributedDataParallel's backward, such as a model's adversary. Everything else is
    delegated to the wrapped optimiser (``zero_grad``, ``state_dict``...)."""

    def __init__(self, optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
        self.optimizer = optimizer
        self.world_size = ctx.world_size

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:  # a parameter unused on this rank still joins the average
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)
        self.optimizer.step()

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


def adversary_optimizer(optimizer, ctx: DistContext):
    """The adversary's optimiser as the engine uses it: unchanged in one process, its
    gradients averaged over the ranks when distributed."""
    if optimizer is None or not ctx.is_distributed:
        return optimizer
    return AveragedGradientOptimizer(optimizer, ctx)


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum of each number over the ranks (unchanged in one process)."""
    if not ctx.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_rng_states(ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's CPU torch RNG state (a list of one in a single process)."""
    state = torch.get_rng_state()
    if not ctx.is_distributed:
        return [state]
    states = [torch.empty_like(state) for _ in range(ctx.world_size)]
    dist.all_gather_object(states, state)
    return states


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
