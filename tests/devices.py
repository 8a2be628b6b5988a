"""The default-device check (docs/architecture.md, "Devices"), reusable by every model's tests.

Run a model and guide under ``torch.set_default_device("meta")`` with real CPU inputs: a
tensor created on the default device (instead of from an input's device) is a meta
tensor, and mixing it with the CPU tensors raises.
"""

from __future__ import annotations

import contextlib

import pyro
import torch
from pyro.infer import Trace_ELBO


@contextlib.contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def assert_device_clean(model, guide, batch, num_particles: int = 2, elbo_cls=Trace_ELBO) -> None:
    """ELBO loss and its gradients computed with the default device set to meta."""
    elbo = elbo_cls(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=model.max_plate_nesting)
    with default_device_meta():
        loss = elbo.differentiable_loss(model, guide, batch)
        loss.backward()
    assert loss.device.type == "cpu"
    assert torch.isfinite(loss)


def run_device_clean(fn, *args, **kwargs):
    """Call ``fn`` with the default device set to meta (for evaluation code)."""
    with default_device_meta():
        return fn(*args, **kwargs)
