"""Guide of DCD-FG (:mod:`pyro_perturb.models.dcdfg`): the graph's parameters are point
estimates of the model and there are no per-cell latents, so the guide samples nothing.

``posterior_latents`` returns each cell's factor values (``(B, m)``, the model's final
graph applied to the cell's standardised log-normalised expression): the guide reads them
from its model, which :func:`pyro_perturb.contract.bind_model` hands it when the pair is
built (:func:`pyro_perturb.registry.build`).
"""

from __future__ import annotations

import torch
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..normalize import log1p_normalize


class DCDFGGuide(PyroModule):
    """The empty guide of :class:`~pyro_perturb.models.dcdfg.DCDFGModel`; same signature."""

    def __init__(self, spec: DataSpec, n_factors: int = 20) -> None:
        super().__init__()
        self.spec = spec
        self.n_factors = n_factors
        self._model = ()  # a tuple, so that the model is not a submodule (no double state)

    def bind_model(self, model) -> None:
        """Read factor values from ``model`` (called once when the pair is built)."""
        self._model = (model,)

    def forward(self, batch: Batch, observe: bool = True):
        return None

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"X_latent": (B, m)}``: the cells' factor values under the final graph."""
        if not self._model:
            raise RuntimeError("DCDFGGuide.posterior_latents needs its model: build the pair with registry.build")
        model = self._model[0]
        if batch.x is None:
            raise ValueError("posterior_latents needs the cells' counts (batch.x)")
        z = model._standardise(log1p_normalize(batch.x, batch.library))
        u, _ = model.dag_masks()
        return {"X_latent": model.factor_values(z, u)}
