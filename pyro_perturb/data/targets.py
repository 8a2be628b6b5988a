"""Which measured gene each perturbation targets: the intervention contract of the
gene-graph models (DCD-FG, NODAGS-Flow).

A perturbation label names its targeted gene as it appears in ``var_names`` (a
combination ``A+B`` targets both; the control targets none). A graph model replaces the
conditional of every targeted gene in a cell (a perfect intervention), so it needs, per
single perturbation of the :class:`~pyro_perturb.data.DataSpec`, the column of its gene.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp
import torch

from .anndata import DataSpec, PerturbationData

#: how a perturbation that names no measured gene is treated: ``"error"`` refuses the
#: data; ``"ignore"`` keeps its cells with no targeted gene (the graph then treats them as
#: observational cells: right when the targeted gene is simply not among the measured
#: ones, e.g. a panel of 300 genes, and the knockout acts only through measured genes)
UNMATCHED_TARGETS = ("error", "ignore")


def unmatched_perturbations(spec: DataSpec) -> list[str]:
    """The single perturbations of ``spec`` whose name is not a gene of ``spec.genes``."""
    genes = set(spec.genes)
    return [p for p in spec.perturbations if p not in genes]


def target_matrix(spec: DataSpec, unmatched: str = "error") -> torch.Tensor:
    """``(T, G)`` float 0/1 matrix: row t has a 1 at the gene that perturbation t targets.

    A cell's targeted genes are ``(batch.d @ target_matrix) > 0`` (any positive dose
    intervenes). ``unmatched`` (see :data:`UNMATCHED_TARGETS`) says what to do with a
    perturbation that names no measured gene: ``"error"`` raises a ``ValueError``
    naming them; ``"ignore"`` leaves its row zero.
    """
    if unmatched not in UNMATCHED_TARGETS:
        raise ValueError(f"unmatched={unmatched!r}; choose one of {UNMATCHED_TARGETS}")
    missing = unmatched_perturbations(spec)
    if missing and unmatched == "error":
        shown = ", ".join(repr(m) for m in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(
            f"{len(missing)} of {spec.n_perturbations} perturbations name no measured gene "
            f"(var_names): {shown}. A gene-graph model needs each perturbation to name its "
            "targeted gene; pass unmatched_targets='ignore' (--set unmatched_targets=ignore) "
            "to keep those cells as observational"
        )
    column = {g: j for j, g in enumerate(spec.genes)}
    matrix = torch.zeros(spec.n_perturbations, spec.n_genes)
    for t, name in enumerate(spec.perturbations):
        if name in column:
            matrix[t, column[name]] = 1.0
    return matrix


def targeted_genes(dosage: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B, G)`` bool: the genes each cell's perturbations target. ``dosage`` ``(B, T)``,
    ``targets`` ``(T, G)`` (:func:`target_matrix`, on the dosage's device)."""
    return (dosage.abs() @ targets) > 0


def gene_perturbation_vocabulary(spec: DataSpec) -> list[str]:
    """The single perturbations of ``spec`` plus every measured gene, sorted: what a
    gene-graph model's vocabulary is (:func:`with_gene_perturbations`).

    A gene whose name contains the combination separator or is the control label cannot
    be written as a label and is left out."""
    genes = [g for g in spec.genes if spec.separator not in g and g != spec.control]
    return sorted(set(spec.perturbations) | set(genes))


def with_gene_perturbations(data: PerturbationData) -> PerturbationData:
    """``data`` with every measured gene in its vocabulary of single perturbations.

    A gene graph knows how to intervene on any of its genes, also on one whose knockout
    is not in the data (e.g. a knockout held out of training, or never run): with this
    vocabulary, ``Run.effects(["GENE"])`` / ``predict --perturbations GENE`` and
    encoding new data whose labels name measured genes work like for the data's own
    perturbations. The training code applies it to the models with a graph
    (:func:`pyro_perturb.contract.has_adjacency`). The dosage gains zero columns for
    the added genes (columns follow :func:`gene_perturbation_vocabulary`); the label
    vocabulary, counts and split are ``data``'s (shared, not copied).
    """
    return with_perturbation_vocabulary(data, gene_perturbation_vocabulary(data.spec))


def with_perturbation_vocabulary(data: PerturbationData, vocabulary: list[str]) -> PerturbationData:
    """``data`` re-encoded over a wider vocabulary of single perturbations (its dosage
    columns moved to theirs, zero columns for the others); ``data`` itself when the
    vocabulary is already its own. A perturbation of ``data`` outside ``vocabulary`` is a
    ``ValueError`` naming it."""
    spec = data.spec
    vocabulary = list(vocabulary)
    if vocabulary == list(spec.perturbations):
        return data
    missing = [p for p in spec.perturbations if p not in set(vocabulary)]
    if missing:
        raise ValueError(f"the data's perturbations {missing[:5]} are not in the vocabulary of {len(vocabulary)} perturbations")
    column = {p: j for j, p in enumerate(vocabulary)}
    old_to_new = np.array([column[p] for p in spec.perturbations], dtype=np.int64)
    coo = data.dosage.tocoo()
    dosage = sp.csr_matrix(
        (coo.data, (coo.row, old_to_new[coo.col] if coo.nnz else coo.col)),
        shape=(data.n_cells, len(vocabulary)),
    )
    return PerturbationData(
        data.adata, data.counts, dosage, data.labels, data.covariates, data.library, data.split,
        replace(spec, perturbations=vocabulary),
    )
