"""Guide of NODAGS-Flow (:mod:`pyro_perturb.models.nodags`): it samples nothing.

The model's parameters are point estimates (penalised maximum likelihood) and it has no
latent site: a cell's SEM noise ``e = s - F(s)`` is a deterministic function of its
expression. ``posterior_latents`` returns that noise, computed by the model's own map,
which the registry hands to the guide when it builds the pair (``bind_model``).
"""

from __future__ import annotations

import torch
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..normalize import log1p_normalize


class NODAGSGuide(PyroModule):
    """The empty guide of a model without latent sites; same signature as the model."""

    def __init__(self, spec: DataSpec) -> None:
        super().__init__()
        self.spec = spec
        # a plain reference (not a submodule: the model's parameters stay the model's own)
        self._bound: list = []

    def bind_model(self, model) -> None:
        """Remember the model whose map ``posterior_latents`` uses."""
        self._bound[:] = [model]

    def forward(self, batch: Batch, observe: bool = True) -> None:
        return None

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"X_latent": (B, G)}``: each cell's SEM noise ``e = s - F(s)`` in standardised
        units (``s`` the standardised ``log1p(1e4 x / l)``), 0 on the genes its
        perturbations target (their values are set, not generated)."""
        if not self._bound:
            raise RuntimeError("NODAGSGuide.posterior_latents needs its model: build the pair with pyro_perturb.registry.build")
        model = self._bound[0]
        y = log1p_normalize(batch.x, batch.library)
        targeted, _, _ = model._levels(batch)
        return {"X_latent": model.noise(y, targeted)}
