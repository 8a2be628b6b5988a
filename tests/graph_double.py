"""A test double of the gene-graph models: a linear Gaussian SEM on ``y = log1p(1e4 x / l)``
with a learned weight matrix ``W`` (``W[i, j]``: gene i -> gene j), perfect interventions
(targeted genes are not scored), no latent site. Registered only inside the tests that use
it (:func:`registered`), so the zoo's own tests never see it.

    y_j | y_-j ~ N(b_j + sum_i W_ij y_i, s_j^2)   for every gene j the cell does not target

With ``x = None`` (posterior predictive) it propagates one step from the baseline: the
targeted genes are set to 0 (a knockout) and every other gene gets ``b + (b * free) @ W``.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_perturb.contract import CELL_PLATE, OBSERVED_SITE, Adjacency
from pyro_perturb.data import simulate_graph
from pyro_perturb.data.targets import target_matrix, targeted_genes
from pyro_perturb.normalize import log1p_normalize
from pyro_perturb.registry import _REGISTRY, ModelEntry, register

NAME = "graph_double"


class LinearSEMModel(PyroModule):
    max_plate_nesting = 1

    def __init__(self, spec, init_scale: float = 0.01, probabilities: bool = False) -> None:
        super().__init__()
        G = spec.n_genes
        self.genes = list(spec.genes)
        self.probabilities = probabilities
        self.W = nn.Parameter(init_scale * torch.randn(G, G))
        self.bias = nn.Parameter(torch.zeros(G))
        self.log_sd = nn.Parameter(torch.zeros(G))
        self.register_buffer("targets", target_matrix(spec, "ignore"), persistent=False)
        self.likelihood = SimpleNamespace(kind="gaussian")

    def _weights(self) -> torch.Tensor:
        return self.W * (1 - torch.eye(self.W.shape[0], device=self.W.device, dtype=self.W.dtype))

    def adjacency(self) -> Adjacency:
        w = self._weights().detach().cpu().numpy()
        if self.probabilities:  # a double of a model that reports edge probabilities
            return Adjacency(1 / (1 + np.exp(-(np.abs(w) - 0.1) * 50)), True, self.genes)
        return Adjacency(w, False, self.genes)

    def forward(self, batch, observe: bool = True) -> torch.Tensor:
        targeted = targeted_genes(batch.d, self.targets.to(batch.d.device))
        sd = self.log_sd.exp()
        with pyro.plate(CELL_PLATE, batch.n_cells, subsample=batch.index):
            if observe and batch.x is not None:
                y = log1p_normalize(batch.x, batch.library)
                loc = self.bias + y @ self._weights()
                return pyro.sample(OBSERVED_SITE, dist.Normal(loc, sd).mask(~targeted).to_event(1), obs=y)
            free = (~targeted).to(self.bias.dtype)
            loc = (self.bias + (self.bias * free) @ self._weights()) * free
            return pyro.sample(OBSERVED_SITE, dist.Normal(loc, sd).to_event(1))


class NoLatentGuide(PyroModule):
    def __init__(self, spec, init_scale: float = 0.01, probabilities: bool = False) -> None:
        super().__init__()

    def forward(self, batch, observe: bool = True) -> None:
        return None

    def posterior_latents(self, batch) -> dict:
        return {"X_latent": torch.zeros(batch.size, 0, device=batch.d.device)}


@contextlib.contextmanager
def registered(name: str = NAME):
    """Register the double under ``name`` for the duration of the block."""
    register(ModelEntry(
        name=name,
        description="test double: linear Gaussian SEM on log1p-normalised expression",
        model="tests.graph_double:LinearSEMModel",
        guide="tests.graph_double:NoLatentGuide",
        train_defaults={"lr": 5e-2, "batch_size": 128, "max_epochs": 30, "progress": False},
    ))
    try:
        yield name
    finally:
        _REGISTRY.pop(name, None)


def simulate_chain(seed: int = 0, n_genes: int = 5, cells_per_label: int = 80, n_control: int = 200,
                   knockouts: tuple[str, ...] = ("g0", "g1", "g2")):
    """A tiny linear SEM on a chain g0 -> g1 -> ... (weight 1.5), with knockouts of
    ``knockouts`` (SEM value set to -2), as an AnnData of the graph simulators' conventions."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(n_genes)]
    adjacency = np.zeros((n_genes, n_genes))
    for i in range(n_genes - 1):
        adjacency[i, i + 1] = 1.5
    labels = ["control"] * n_control + [k for k in knockouts for _ in range(cells_per_label)]
    values = np.zeros((len(labels), n_genes))
    for c, lab in enumerate(labels):
        for j in range(n_genes):
            if lab == genes[j]:
                values[c, j] = -2.0
            else:
                values[c, j] = values[c] @ adjacency[:, j] + 0.5 * rng.standard_normal()
    counts, _ = simulate_graph.counts_from_sem(values, rng)
    return simulate_graph.graph_anndata(counts, np.array(labels), genes, adjacency, values,
                                        {"simulator": "test_chain", "seed": seed})
