"""The default-device check (docs/architecture.md, "Devices"), reusable by every model's tests.

Run a model and guide under ``torch.set_default_device("meta")`` with real inputs: a
tensor created on the default device (instead of from an input's device) is a meta
tensor, and mixing it with the real tensors raises.

The inputs live on :data:`TEST_DEVICE`: the CPU, or the device named by the environment
variable ``PYRO_PERTURB_TEST_DEVICE`` (``cuda`` on a GPU machine, see bench/gpu_check.sh);
the checks move their modules, batches and tensors there.
"""

from __future__ import annotations

import contextlib
import os

import pyro
import torch
from pyro.infer import Trace_ELBO

from pyro_perturb.data import Batch

#: the device the device checks run on (``PYRO_PERTURB_TEST_DEVICE``, default cpu)
TEST_DEVICE = torch.device(os.environ.get("PYRO_PERTURB_TEST_DEVICE", "cpu"))


@contextlib.contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def to_test_device(value):
    """A module (moved in place), a :class:`Batch` or a tensor on :data:`TEST_DEVICE`;
    anything else as it is."""
    if isinstance(value, torch.nn.Module):
        return value.to(TEST_DEVICE)
    if isinstance(value, (Batch, torch.Tensor)):
        return value.to(TEST_DEVICE)
    return value


def assert_device_clean(model, guide, batch, num_particles: int = 2, elbo_cls=Trace_ELBO) -> None:
    """ELBO loss and its gradients computed with the default device set to meta."""
    model, guide, batch = (to_test_device(v) for v in (model, guide, batch))
    elbo = elbo_cls(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=model.max_plate_nesting)
    with default_device_meta():
        loss = elbo.differentiable_loss(model, guide, batch)
        loss.backward()
    assert loss.device.type == TEST_DEVICE.type
    assert torch.isfinite(loss)


def run_device_clean(fn, *args, **kwargs):
    """Call ``fn`` with the default device set to meta (for evaluation code), its
    module, batch and tensor arguments on :data:`TEST_DEVICE`."""
    args = [to_test_device(v) for v in args]
    kwargs = {k: to_test_device(v) for k, v in kwargs.items()}
    with default_device_meta():
        return fn(*args, **kwargs)
