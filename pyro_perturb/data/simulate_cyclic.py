"""Cyclic gene graphs with ground truth: the synthetic setting of NODAGS-Flow.

:func:`cyclic_graph` draws a directed Erdos-Renyi graph with cycles over G genes (the
paper's setting: 10-20 nodes, an expected out-degree of 2, edge weights of magnitude
U(0.2, 0.8) with random signs), makes its structural equations contractive, and simulates
cells by fixed-point iteration::

    v = U_I (F(v) + e) + (1 - U_I) c,     e_g ~ N(0, noise_scale^2)

with ``F(v) = v W`` (``mechanism="linear"``) or ``F(v) = tanh(v W + b)``
(``"nonlinear"``), ``||W||_2 < 1`` so that ``F`` is a contraction and ``v`` its unique
fixed point. Control cells have no target; every gene is knocked down in its own group of
cells (``U_I`` zeroes the targeted gene, which is set to ``c ~ N(knockdown_level,
knockdown_sd^2)``); optional double knockdowns are held out (test split), as the paper's
validation interventions. Counts follow the values through
:func:`~pyro_perturb.data.simulate_graph.counts_from_sem`, and the AnnData follows the
graph simulators' conventions (:mod:`pyro_perturb.data.simulate_graph`).
"""

from __future__ import annotations

import numpy as np

from .simulate_graph import counts_from_sem, graph_anndata
from .splits import random_split

CONTROL = "control"
CYCLIC_MECHANISMS = ("linear", "nonlinear")


def _has_cycle(adjacency: np.ndarray) -> bool:
    """Whether the directed graph ``adjacency != 0`` has a directed cycle (Kahn's algorithm)."""
    a = adjacency != 0
    indegree = a.sum(0)
    queue = list(np.flatnonzero(indegree == 0))
    removed = 0
    while queue:
        node = queue.pop()
        removed += 1
        for child in np.flatnonzero(a[node]):
            indegree[child] -= 1
            if indegree[child] == 0:
                queue.append(child)
    return removed < len(a)


def random_cyclic_weights(
    rng: np.random.Generator, n_genes: int, expected_degree: float = 2.0,
    weight_range: tuple[float, float] = (0.2, 0.8), contraction: float = 1 / 1.1, max_tries: int = 1000,
) -> np.ndarray:
    """``(G, G)`` weights ``W[i, j]`` of edge i -> j: a directed Erdos-Renyi graph (each
    ordered pair an edge with probability ``expected_degree / (G - 1)``, no self loops)
    redrawn until it has a directed cycle, weights ``+-U(weight_range)``, then scaled so
    that ``||W||_2 <= contraction`` (only scaled down)."""
    if n_genes < 2:
        raise ValueError(f"n_genes must be >= 2 for a graph with a cycle, got {n_genes}")
    if not 0 < expected_degree <= n_genes - 1:
        raise ValueError(f"expected_degree must be in (0, n_genes - 1 = {n_genes - 1}], got {expected_degree}")
    p = expected_degree / (n_genes - 1)
    for _ in range(max_tries):
        edges = (rng.random((n_genes, n_genes)) < p) & ~np.eye(n_genes, dtype=bool)
        if _has_cycle(edges):
            break
    else:
        raise ValueError(f"no cyclic graph in {max_tries} draws at expected_degree={expected_degree}; raise it")
    low, high = weight_range
    weights = rng.uniform(low, high, (n_genes, n_genes)) * rng.choice([-1.0, 1.0], (n_genes, n_genes)) * edges
    norm = np.linalg.norm(weights, 2)
    return weights * min(1.0, contraction / norm) if norm > 0 else weights


def sem_map(weights: np.ndarray, bias: np.ndarray | None, mechanism: str):
    """The structural map ``F`` ``(n, G) -> (n, G)`` of :func:`cyclic_graph`."""
    if mechanism == "linear":
        return lambda v: v @ weights
    return lambda v: np.tanh(v @ weights + bias)


def solve_sem(
    fn, targeted: np.ndarray, levels: np.ndarray, noise: np.ndarray, tolerance: float = 1e-10, max_iterations: int = 2000
) -> np.ndarray:
    """The fixed point ``v = where(targeted, levels, F(v) + noise)`` ``(n, G)`` by iteration
    (raises ``ValueError`` if it does not converge: ``F`` is then not a contraction)."""
    v = np.where(targeted, levels, noise)
    for _ in range(max_iterations):
        new = np.where(targeted, levels, fn(v) + noise)
        if np.abs(new - v).max() < tolerance:
            return new
        v = new
    raise ValueError("the SEM's fixed-point iteration did not converge: the map is not contractive")


def cyclic_graph(
    seed: int = 0,
    n_genes: int = 10,
    expected_degree: float = 2.0,
    mechanism: str = "linear",
    cells_per_perturbation: int = 200,
    n_control_cells: int = 400,
    n_doubles: int = 0,
    noise_scale: float = 0.5,
    knockdown_level: float = -2.0,
    knockdown_sd: float = 0.5,
    library_size: float = 2e4,
    background_share: float = 0.9,
):
    """A cyclic-SEM perturbation screen with its true graph (module docstring).

    Args:
        seed: seeds the graph, the cells, the counts and the split.
        n_genes: G, the graph's nodes (the paper: 10 and 20).
        expected_degree: expected out-degree (the paper: 2).
        mechanism: ``"linear"`` or ``"nonlinear"`` (``tanh(v W + b)``, ``b ~ N(0, 0.5^2)``).
        cells_per_perturbation: cells knocked down per gene (and per double).
        n_control_cells: unperturbed cells.
        n_doubles: random double knockdowns, all in the test split (held-out interventions).
        noise_scale: sd of the SEM noise.
        knockdown_level, knockdown_sd: the targeted gene's value ``c ~ N(level, sd^2)``.
        library_size: mean counts per cell.
        background_share: when > 0, one more gene, ``"background"``, outside the graph
            (no edge, never targeted, SEM value constant) holding about this share of each
            cell's counts: it stands for the rest of the transcriptome. Without it the
            normalisation by total counts couples the graph's genes (a knockdown raises
            every other gene's share: on 10 genes a dense artefact of each knockdown).

    Returns:
        AnnData: ``X`` counts (G genes, plus ``"background"`` last), ``obs["perturbation"]``
        (gene name, ``"A+B"``, or ``"control"``), ``obs["split"]``, ``varp["true_adjacency"]``
        the weights ``W`` (zero row and column for the background),
        ``layers["sem"]`` the values ``v``, ``uns["ground_truth"]`` with the settings,
        ``"bias"`` (nonlinear), ``"lipschitz_bound"`` (``||W||_2``), ``"graph_genes"`` (the
        graph's nodes: every gene but the background) and ``"doubles"``.
    """
    if mechanism not in CYCLIC_MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r}; choose one of {CYCLIC_MECHANISMS}")
    for name, value in (("cells_per_perturbation", cells_per_perturbation), ("n_control_cells", n_control_cells)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_doubles < 0 or n_doubles > n_genes * (n_genes - 1) // 2:
        raise ValueError(f"n_doubles must be in [0, {n_genes * (n_genes - 1) // 2}], got {n_doubles}")
    graph_rng, cell_rng, count_rng, split_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    weights = random_cyclic_weights(graph_rng, n_genes, expected_degree)
    bias = 0.5 * graph_rng.standard_normal(n_genes) if mechanism == "nonlinear" else None
    lipschitz = float(np.linalg.norm(weights, 2))  # tanh is 1-Lipschitz: the bound of both maps
    if lipschitz >= 1.0:
        raise ValueError(f"the structural map is not contractive (||W||_2 = {lipschitz:.3f})")
    genes = [f"gene_{g:02d}" for g in range(n_genes)]
    pairs = [tuple(sorted(graph_rng.choice(n_genes, 2, replace=False))) for _ in range(4 * n_doubles)]
    doubles = list(dict.fromkeys(pairs))[:n_doubles]

    groups = [((), CONTROL, n_control_cells)] + [((g,), genes[g], cells_per_perturbation) for g in range(n_genes)]
    groups += [((a, b), f"{genes[a]}+{genes[b]}", cells_per_perturbation) for a, b in doubles]
    n_cells = sum(n for _, _, n in groups)
    targeted = np.zeros((n_cells, n_genes), dtype=bool)
    labels = np.empty(n_cells, dtype=object)
    start = 0
    for members, label, n in groups:
        targeted[start : start + n, list(members)] = True
        labels[start : start + n] = label
        start += n
    levels = knockdown_level + knockdown_sd * cell_rng.standard_normal((n_cells, n_genes))
    noise = noise_scale * cell_rng.standard_normal((n_cells, n_genes))
    values = solve_sem(sem_map(weights, bias, mechanism), targeted, levels, noise)

    adjacency = weights
    if background_share > 0:
        if not background_share < 1:
            raise ValueError(f"background_share must be in [0, 1), got {background_share}")
        # constant: its counts do not follow the graph's genes, so their total stops
        # tracking their composition (a share fixed per cell would not dilute anything)
        level = np.log(background_share / (1 - background_share)) + np.log(np.exp(values).mean(0).sum())
        values = np.c_[values, np.full(n_cells, level)]
        genes = genes + ["background"]
        adjacency = np.zeros((n_genes + 1, n_genes + 1))
        adjacency[:n_genes, :n_genes] = weights
    counts, library = counts_from_sem(values, count_rng, library_size=library_size)
    split = random_split(n_cells, seed=int(split_rng.integers(2**31)))
    is_double = np.array([str(lab).count("+") == 1 for lab in labels])
    split[is_double] = "test"
    ground_truth = {
        "simulator": "cyclic_graph",
        "params": {
            "seed": seed, "n_genes": n_genes, "expected_degree": expected_degree, "mechanism": mechanism,
            "cells_per_perturbation": cells_per_perturbation, "n_control_cells": n_control_cells,
            "n_doubles": n_doubles, "noise_scale": noise_scale, "knockdown_level": knockdown_level,
            "knockdown_sd": knockdown_sd, "library_size": library_size, "background_share": background_share,
        },
        "lipschitz_bound": lipschitz,
        # the graph's nodes (every gene but the background): where edge metrics are meaningful
        "graph_genes": list(genes[:n_genes]),
        "doubles": [f"{genes[a]}+{genes[b]}" for a, b in doubles],
        "library": library.astype(np.float32),
    }
    if bias is not None:
        ground_truth["bias"] = bias.astype(np.float32)
    adata = graph_anndata(counts, labels, genes, adjacency, values, ground_truth)
    adata.obs["split"] = np.asarray(split, dtype=object)
    adata.obs["split"] = adata.obs["split"].astype("category")
    return adata


__all__ = ["CYCLIC_MECHANISMS", "cyclic_graph", "random_cyclic_weights", "sem_map", "solve_sem"]
