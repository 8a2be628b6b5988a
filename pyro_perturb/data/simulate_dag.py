"""Causal-DAG simulator with ground truth: single-gene interventions on a structural
equation model (SEM) over a random DAG of genes, turned into counts.

Graphs (``graph=``):

* ``"erdos_renyi"``: a random order of the genes; each ordered pair (earlier -> later) is
  an edge with a fixed probability, ``edges_per_gene`` expected parents per gene.
* ``"scale_free"``: preferential attachment (Barabasi-Albert): genes arrive in a random
  order and each draws about ``edges_per_gene`` parents among the earlier ones with
  probability growing with their degree (hub regulators).
* ``"factor"`` (default): the low-rank factor DAG of DCD-FG (Lopez et al. 2022, their
  synthetic setting): a random order over the G genes and the m factors; a factor takes
  each earlier gene as an input with probability ``p_gene_to_factor`` and a gene takes
  each earlier factor as a parent with probability ``p_factor_to_gene`` (the paper's
  ``p_module = 0.2`` and ``p_vertex = 0.1`` at G = 100, m = 10). The gene graph is
  ``i -> j`` when some factor takes i and feeds j. Factors are latent: deterministic
  aggregates of their input genes, not measured.

Mechanisms (``mechanism=``), node j with parents pa(j) and weights ``w_ij``::

    s_j = sum_i w_ij v_i,        v_j = g_j(s_j) + noise_sd * eps_j

with ``g_j`` the identity (``"linear"``) or a random one-hidden-layer MLP of the scalar
``s_j`` (``"mlp"``: ``g(s) = sum_h a_h leaky_relu(b_h s + c_h)``, 8 units, centred), so that
even thousands of genes are simulated with sparse products. Weights are ``+-U(0.5, 1.5)``
divided by ``sqrt(#parents)`` (bounded variance along long chains); factors get no noise.

Interventions: ``n_interventions`` distinct genes (all genes by default, up to G), one
per perturbation, each with ``cells_per_intervention`` cells, plus ``n_control_cells``
observational cells. ``intervention="knockout"`` (perfect) sets the gene to
``mean - knockout_sd * sd`` (its observational mean and sd, from the control cells);
``"knockdown"`` (imperfect, the gene keeps its parents) subtracts ``knockdown_sd * sd``.
Downstream genes respond through the graph.

Counts: :func:`~pyro_perturb.data.simulate_graph.counts_from_sem`; the AnnData follows
:mod:`~pyro_perturb.data.simulate_graph`'s conventions (``varp["true_adjacency"]`` holds
the gene-to-gene weights: ``w_ij`` for ER / scale-free, the factor path sum ``sum_k
w_ik w_kj`` for factor graphs, with a small floor where paths cancel so that every true
edge stays nonzero). Splits: the cells of ``n_heldout`` interventions (20% by default,
as the paper holds out 20% of its intervention regimes) are ``"test"``; the others
(controls included) go to train / val at random.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .simulate_graph import counts_from_sem, graph_anndata
from .splits import heldout_perturbation_split

GRAPHS = ("erdos_renyi", "scale_free", "factor")
MECHANISMS = ("linear", "mlp")
INTERVENTIONS = ("knockout", "knockdown")
CONTROL = "control"
_MLP_UNITS = 8


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _order_edges(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """(n, n) bool upper-triangular-in-a-random-order DAG: i -> j when order[i] < order[j]."""
    order = rng.permutation(n)
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    earlier = rank[:, None] < rank[None, :]
    return earlier & (rng.random((n, n)) < p)


def erdos_renyi_dag(rng: np.random.Generator, n_genes: int, edges_per_gene: float) -> np.ndarray:
    """(G, G) bool DAG, edge i -> j at ``[i, j]``, about ``edges_per_gene`` parents per gene."""
    p = min(1.0, 2.0 * edges_per_gene / max(n_genes - 1, 1))
    return _order_edges(rng, n_genes, p)


def scale_free_dag(rng: np.random.Generator, n_genes: int, edges_per_gene: float) -> np.ndarray:
    """(G, G) bool DAG by preferential attachment (each new gene draws its parents among
    the earlier ones with probability proportional to degree + 1)."""
    order = rng.permutation(n_genes)
    adjacency = np.zeros((n_genes, n_genes), dtype=bool)
    degree = np.zeros(n_genes)
    for position in range(1, n_genes):
        child = order[position]
        earlier = order[:position]
        k = min(position, rng.poisson(edges_per_gene) if edges_per_gene < 1 else int(round(edges_per_gene)))
        if k == 0:
            continue
        weights = degree[earlier] + 1.0
        parents = rng.choice(earlier, size=k, replace=False, p=weights / weights.sum())
        adjacency[parents, child] = True
        degree[parents] += 1
        degree[child] += k
    return adjacency


def factor_dag(
    rng: np.random.Generator, n_genes: int, n_factors: int, p_gene_to_factor: float, p_factor_to_gene: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bipartite factor DAG: ``U`` (G, m) bool gene -> factor and ``V`` (m, G) bool
    factor -> gene, acyclic through a random order over genes and factors."""
    n = n_genes + n_factors
    order = rng.permutation(n)
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    gene_rank, factor_rank = rank[:n_genes], rank[n_genes:]
    u = (gene_rank[:, None] < factor_rank[None, :]) & (rng.random((n_genes, n_factors)) < p_gene_to_factor)
    v = (factor_rank[:, None] < gene_rank[None, :]) & (rng.random((n_factors, n_genes)) < p_factor_to_gene)
    return u, v


def _weights(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Signed weights ``+-U(0.5, 1.5) / sqrt(#parents)`` on the edges of ``mask`` (dense float)."""
    w = rng.uniform(0.5, 1.5, mask.shape) * rng.choice(np.array([-1.0, 1.0]), mask.shape)
    indegree = np.maximum(mask.sum(axis=0, keepdims=True), 1)
    return np.where(mask, w / np.sqrt(indegree), 0.0)


def _levels(adjacency: np.ndarray) -> list[np.ndarray]:
    """Nodes grouped by longest path from a source (a topological layering)."""
    n = adjacency.shape[0]
    indegree = adjacency.sum(axis=0).astype(int)
    level = np.zeros(n, dtype=int)
    frontier = list(np.nonzero(indegree == 0)[0])
    children = [np.nonzero(adjacency[i])[0] for i in range(n)]
    seen = 0
    while frontier:
        seen += len(frontier)
        nxt = []
        for i in frontier:
            for j in children[i]:
                level[j] = max(level[j], level[i] + 1)
                indegree[j] -= 1
                if indegree[j] == 0:
                    nxt.append(j)
        frontier = nxt
    if seen != n:
        raise ValueError("the graph has a cycle")
    return [np.nonzero(level == k)[0] for k in range(level.max() + 1)]


def _mlp_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "a": rng.normal(0, 1, (n, _MLP_UNITS)) / np.sqrt(_MLP_UNITS) * 2.0,
        "b": rng.normal(0, 1.5, (n, _MLP_UNITS)),
        "c": rng.normal(0, 0.5, (n, _MLP_UNITS)),
    }


def _mechanism(s: np.ndarray, nodes: np.ndarray, mlp: dict[str, np.ndarray] | None) -> np.ndarray:
    """``g_j(s_j)`` for the columns ``nodes`` of ``s`` (n_cells, len(nodes))."""
    if mlp is None:
        return s
    a, b, c = mlp["a"][nodes], mlp["b"][nodes], mlp["c"][nodes]
    pre = s[:, :, None] * b[None] + c[None]
    hidden = np.where(pre > 0, pre, 0.2 * pre)
    centre = np.where(c > 0, c, 0.2 * c)  # g(0) = 0: the output is centred at no input
    return ((hidden - centre[None]) * a[None]).sum(-1)


def _simulate_sem(
    rng: np.random.Generator,
    weights: sp.csc_matrix,
    levels: list[np.ndarray],
    noise_sd: np.ndarray,
    mlp: dict[str, np.ndarray] | None,
    targets: np.ndarray,
    mode: str,
    value: np.ndarray,
) -> np.ndarray:
    """SEM values ``(n_cells, N)`` in topological layers. ``targets`` (n_cells,) is the
    intervened node of each cell (-1: none); ``value`` (n_cells,) its knockout level
    (``mode="knockout"``) or shift (``"knockdown"``)."""
    n_cells, n = len(targets), weights.shape[0]
    values = np.zeros((n_cells, n))
    noise = rng.standard_normal((n_cells, n)) * noise_sd[None]
    cells = np.nonzero(targets >= 0)[0]
    for nodes in levels:
        s = np.asarray(sp.csr_matrix(values) @ weights[:, nodes].toarray()) if len(nodes) else None
        values[:, nodes] = _mechanism(s, nodes, mlp) + noise[:, nodes]
        hit = cells[np.isin(targets[cells], nodes)]
        if len(hit):
            if mode == "knockout":
                values[hit, targets[hit]] = value[hit]
            else:
                values[hit, targets[hit]] += value[hit]
    return values


def causal_dag(
    n_genes: int = 20,
    graph: str = "factor",
    mechanism: str = "linear",
    n_factors: int = 4,
    p_gene_to_factor: float = 0.3,
    p_factor_to_gene: float = 0.3,
    edges_per_gene: float = 1.0,
    n_interventions: int | None = None,
    cells_per_intervention: int = 50,
    n_control_cells: int = 250,
    intervention: str = "knockout",
    knockout_sd: float = 3.0,
    knockdown_sd: float = 1.5,
    noise_sd: float = 0.5,
    n_heldout: int | None = None,
    val_fraction: float = 0.2,
    library_size: float = 2e4,
    seed: int = 0,
) -> ad.AnnData:
    """Interventional single-cell counts from a random causal DAG (module docstring).

    Args:
        n_genes: G (a few thousand is fine: the SEM is simulated with sparse products).
        graph: ``"factor"``, ``"erdos_renyi"`` or ``"scale_free"``.
        mechanism: ``"linear"`` or ``"mlp"``.
        n_factors, p_gene_to_factor, p_factor_to_gene: the factor graph (``graph="factor"``).
        edges_per_gene: expected parents per gene (ER, scale-free).
        n_interventions: distinct genes knocked out, one perturbation each (default: all
            G genes; at most G).
        cells_per_intervention, n_control_cells: cells per perturbation / of controls.
        intervention: ``"knockout"`` (perfect) or ``"knockdown"`` (shift, parents kept).
        knockout_sd, knockdown_sd: the intervention strength in observational sds.
        noise_sd: SEM noise sd of every gene.
        n_heldout: interventions whose cells are ``"test"`` (default: 20% of them).
        val_fraction: fraction of the other cells sent to ``"val"``.
        library_size: median counts per cell (:func:`counts_from_sem`).
        seed: everything is deterministic given it.

    Returns:
        AnnData of counts (simulate_graph conventions), ``obs["split"]``,
        ``obs["heldout"]``, ``uns["ground_truth"]`` with ``"simulator"`` ("causal_dag"),
        the settings, ``"perturbations"`` (names = targeted genes) and, for factor graphs,
        ``"factor_inputs"`` (G, m) and ``"factor_outputs"`` (m, G).
    """
    _check(isinstance(n_genes, (int, np.integer)) and n_genes >= 2, f"n_genes must be an integer >= 2, got {n_genes!r}")
    _check(graph in GRAPHS, f"graph must be one of {GRAPHS}, got {graph!r}")
    _check(mechanism in MECHANISMS, f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    _check(intervention in INTERVENTIONS, f"intervention must be one of {INTERVENTIONS}, got {intervention!r}")
    _check(n_factors >= 1, f"n_factors must be >= 1, got {n_factors!r}")
    for name, p in (("p_gene_to_factor", p_gene_to_factor), ("p_factor_to_gene", p_factor_to_gene)):
        _check(0.0 <= p <= 1.0, f"{name} must be in [0, 1], got {p!r}")
    _check(edges_per_gene >= 0, f"edges_per_gene must be >= 0, got {edges_per_gene!r}")
    n_interventions = n_genes if n_interventions is None else n_interventions
    _check(1 <= n_interventions <= n_genes, f"n_interventions must be in [1, n_genes={n_genes}], got {n_interventions!r}")
    _check(cells_per_intervention >= 1 and n_control_cells >= 1, "cells_per_intervention and n_control_cells must be >= 1")
    _check(noise_sd > 0, f"noise_sd must be > 0, got {noise_sd!r}")
    n_heldout = int(round(0.2 * n_interventions)) if n_heldout is None else n_heldout
    _check(0 <= n_heldout < n_interventions, f"n_heldout must be in [0, n_interventions), got {n_heldout!r}")
    _check(0.0 <= val_fraction < 1.0, f"val_fraction must be in [0, 1), got {val_fraction!r}")
    settings = {k: v for k, v in locals().items() if k != "name" and k != "p" and v is not None}

    rng_graph, rng_design, rng_sem, rng_counts = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))

    # the node graph (genes, then factors) and its weights
    if graph == "factor":
        u, v = factor_dag(rng_graph, n_genes, n_factors, p_gene_to_factor, p_factor_to_gene)
        n_nodes = n_genes + n_factors
        node_adj = np.zeros((n_nodes, n_nodes), dtype=bool)
        node_adj[:n_genes, n_genes:] = u
        node_adj[n_genes:, :n_genes] = v
    else:
        gene_adj = (erdos_renyi_dag if graph == "erdos_renyi" else scale_free_dag)(rng_graph, n_genes, edges_per_gene)
        n_nodes = n_genes
        node_adj = gene_adj
    node_w = _weights(rng_graph, node_adj)
    mlp = _mlp_params(rng_graph, n_nodes) if mechanism == "mlp" else None
    if graph == "factor":
        path = node_w[:n_genes, n_genes:] @ node_w[n_genes:, :n_genes]
        gene_adj = (u.astype(int) @ v.astype(int)) > 0
        true_w = np.where(gene_adj, np.where(np.abs(path) > 1e-3, path, 1e-3), 0.0)
    else:
        true_w = node_w
    np.fill_diagonal(true_w, 0.0)
    levels = _levels(node_adj)
    weights = sp.csc_matrix(node_w)
    noise = np.full(n_nodes, float(noise_sd))
    noise[n_genes:] = 0.0

    # design: which genes are knocked out; observational statistics from a control pass
    genes = [f"g{i:0{max(3, len(str(n_genes - 1)))}d}" for i in range(n_genes)]
    targeted = np.sort(rng_design.choice(n_genes, size=n_interventions, replace=False))
    names = [genes[t] for t in targeted]
    heldout = sorted(rng_design.choice(names, size=n_heldout, replace=False).tolist())
    code = np.concatenate([np.full(n_control_cells, -1), np.repeat(np.arange(n_interventions), cells_per_intervention)])
    target_node = np.where(code >= 0, targeted[np.maximum(code, 0)], -1)

    reference = _simulate_sem(rng_sem, weights, levels, noise, mlp, np.full(2000, -1), "knockout", np.zeros(2000))
    mean, sd = reference.mean(0), reference.std(0) + 1e-6
    safe = np.maximum(target_node, 0)
    value = mean[safe] - knockout_sd * sd[safe] if intervention == "knockout" else -knockdown_sd * sd[safe]
    values = _simulate_sem(rng_sem, weights, levels, noise, mlp, target_node, intervention, value)[:, :n_genes]

    counts, _ = counts_from_sem(values, rng_counts, library_size=library_size)
    labels = np.where(code < 0, CONTROL, np.asarray(names, dtype=object)[np.maximum(code, 0)])
    ground_truth: dict[str, Any] = {
        "simulator": "causal_dag",
        "params": settings,
        "perturbations": names,
        "heldout": heldout,
        "observational_mean": mean[:n_genes].astype(np.float32),
        "observational_sd": sd[:n_genes].astype(np.float32),
    }
    if graph == "factor":
        ground_truth["factor_inputs"] = u.astype(np.int8)
        ground_truth["factor_outputs"] = v.astype(np.int8)
    adata = graph_anndata(counts, labels, genes, true_w, values, ground_truth)
    adata.obs["split"] = "train"
    adata = heldout_perturbation_split(adata, heldout, val_fraction=val_fraction, seed=seed)
    adata.obs["heldout"] = np.isin(labels, heldout)
    return adata


__all__ = ["GRAPHS", "INTERVENTIONS", "MECHANISMS", "causal_dag", "erdos_renyi_dag", "factor_dag", "scale_free_dag"]
