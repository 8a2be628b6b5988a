"""Amortised guide of scVI (:mod:`pyro_perturb.models.scvi`).

As in scVI, the encoders see ``log1p`` counts (not standardised) with the one-hot
covariates (and the dosage when ``use_perturbation``)::

    q(z_i | x_i, c_i)          = Normal(enc_z([log1p x_i, onehot(c_i)]))        ("z")
    q(log l_i | x_i, c_i)      = Normal(enc_l([log1p x_i, onehot(c_i)]))        ("log_library",
                                                                 library="latent" only)

Both encoders are MLPs with dropout (``dropout_rate``, 0.1 as in scVI) after each
hidden layer. ``posterior_latents`` returns the means of z only.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..nn import GaussianEncoder, covariate_onehot


class SCVIGuide(PyroModule):
    """q(z | x, c) [q(log l | x, c)]; same signature as the model.

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent, n_hidden, n_layers, library, use_perturbation: as the model's.
        dropout_rate: dropout after each hidden layer of the encoders, in ``[0, 1)``.
    """

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        library: Literal["observed", "latent"] = "observed",
        use_perturbation: bool = False,
        dropout_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"scVI's dropout_rate must be in [0, 1), got {dropout_rate!r}")
        self.spec = spec
        self.use_perturbation = bool(use_perturbation)
        n_inputs = spec.n_genes + sum(spec.covariate_sizes) + (spec.n_perturbations if use_perturbation else 0)
        hidden = [n_hidden] * n_layers
        self.z_encoder = GaussianEncoder(n_inputs, hidden, n_latent, dropout=dropout_rate)
        self.library_encoder = GaussianEncoder(n_inputs, hidden, 1, dropout=dropout_rate) if library == "latent" else None

    @torch.no_grad()
    def init_from_data(self, data) -> None:
        """Start q(log l)'s mean at the training cells' mean log library (its output
        bias), not at 0: the first steps then decode at the data's depth."""
        if self.library_encoder is None:
            return
        idx = data.indices("train")
        library = np.asarray(data.library[idx if len(idx) else slice(None)], dtype=np.float64)
        self.library_encoder.net[-1].bias[0] = float(np.log(np.maximum(library, 1.0)).mean())

    def _inputs(self, batch: Batch) -> torch.Tensor:
        parts = [torch.log1p(batch.x), covariate_onehot(batch.c, self.spec.covariate_sizes).to(batch.x.dtype)]
        if self.use_perturbation:
            parts.append(batch.d)
        return torch.cat(parts, dim=-1)

    def posterior(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"z": (loc (B, L), scale (B, L)), "log_library": (loc (B,), scale (B,))}``
        (the second with ``library="latent"`` only)."""
        inputs = self._inputs(batch)
        out = {"z": self.z_encoder(inputs)}
        if self.library_encoder is not None:
            loc, scale = self.library_encoder(inputs)
            out["log_library"] = (loc.squeeze(-1), scale.squeeze(-1))
        return out

    def forward(self, batch: Batch, observe: bool = True):
        if batch.x is None:
            # posterior predictive without observations: the locals come from the prior
            return
        posterior = self.posterior(batch)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=batch.kl_weight):
                pyro.sample("z", dist.Normal(*posterior["z"]).to_event(1))
                if "log_library" in posterior:
                    pyro.sample("log_library", dist.Normal(*posterior["log_library"]))

    @torch.no_grad()
    def posterior_latents(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Posterior means: ``{"X_latent": (B, L)}``."""
        return {"X_latent": self.z_encoder(self._inputs(batch))[0]}


__all__ = ["SCVIGuide"]
