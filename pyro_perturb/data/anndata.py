"""AnnData -> tensors: the data contract of pyro-perturb.

:class:`PerturbationData` turns an :class:`anndata.AnnData` into what every model of the
zoo consumes (see :class:`~pyro_perturb.data.batch.Batch`):

* ``counts``: the raw count matrix, ``adata.X`` or ``adata.layers[layer]``, kept as it is
  (dense, CSR or backed on disk; a backed CSR matrix is read by row slices with h5py, see
  :class:`BackedCSRRows`) and read batch by batch, never densified or loaded whole;
* ``dosage``: a sparse ``(n_cells, n_perturbations)`` matrix over the vocabulary of
  *single* perturbations: 0 for control cells, one-hot for a single perturbation,
  multi-hot for a combination ``A+B``, optionally scaled by a dose column;
* ``labels``: the code of each cell's full perturbation label (combinations are labels of
  their own; code 0 is the control), used by the one-hot models (SVAE+, sVAE, iVAE);
* ``covariates``: ``(n_cells, n_covariate_keys)`` integer codes of categorical columns;
* ``library``: the observed library size (total counts) of each cell;
* ``split``: ``train`` / ``val`` / ``test`` per cell.

:class:`DataSpec` is what a trained model remembers about its data (genes, vocabularies);
passing it back to :meth:`PerturbationData.from_anndata` encodes new data with the same
vocabulary and refuses perturbations, genes or covariate values the model never learned.

Every problem with the input raises a :class:`ValueError` that names the column, value or
shape at fault.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .batch import Batch
from .splits import HELDOUT_CONTROL_FRACTION, hold_out_controls, random_split

SPLITS = ("train", "val", "test")
_CHUNK = 4096  # rows read at a time when scanning counts (bounded memory on backed data)

#: The largest count accepted: 2**24 = 16,777,216, the largest integer up to which float32
#: (the precision of every model's tensors) represents all integers exactly. Above it,
#: counts are silently rounded on the way to the model (and would overflow float32 at
#: ~3.4e38); UMI counts of single cells stay far below it.
MAX_COUNT = 2**24

#: The fewest cells a random 64/16/20 train/val/test split gives at least one cell each
#: (3 cells would leave ``val`` empty).
MIN_CELLS_RANDOM_SPLIT = 4


@dataclass
class DataSpec:
    """What a model knows about its data; saved in a run's ``config.json``.

    Attributes:
        genes: gene names, in column order (length G).
        perturbations: vocabulary of single perturbations (dosage columns, length T).
        labels: full perturbation labels seen in training data; ``labels[0]`` is the
            control; combinations such as ``"A+B"`` are labels of their own.
        covariate_keys: names of the categorical ``obs`` columns used as covariates.
        covariate_categories: for each covariate key, its categories (codes index them).
        control: the control label.
        separator: the combination separator.
        perturbation_key, layer, dose_key: where the data came from.
    """

    genes: list[str]
    perturbations: list[str]
    labels: list[str]
    covariate_keys: list[str] = field(default_factory=list)
    covariate_categories: list[list[str]] = field(default_factory=list)
    control: str = "control"
    separator: str = "+"
    perturbation_key: str = "perturbation"
    layer: str | None = None
    dose_key: str | None = None

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_perturbations(self) -> int:
        return len(self.perturbations)

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    @property
    def covariate_sizes(self) -> list[int]:
        return [len(c) for c in self.covariate_categories]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**d)

    def dosage_of(self, label: str, dose: float = 1.0) -> np.ndarray:
        """Dosage vector ``(T,)`` of a label such as ``"A"``, ``"A+B"`` or the control."""
        vec = np.zeros(self.n_perturbations, dtype=np.float32)
        index = {p: i for i, p in enumerate(self.perturbations)}
        for part in split_label(label, self.control, self.separator):
            if part not in index:
                raise ValueError(
                    f"perturbation {part!r} (in label {label!r}) is not in the model's "
                    f"vocabulary of {self.n_perturbations} perturbations"
                )
            vec[index[part]] += dose
        return vec


    def request_batch(
        self,
        labels: Sequence[str],
        library,
        covariate_codes: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> Batch:
        """A :class:`Batch` without observations (``x=None``) asking for given treatments.

        One row per entry of ``labels`` (dosage from :meth:`dosage_of`, label code, -1 for
        a label outside the vocabulary), all with the same covariate codes (default: the
        first category of each key) and the given library size(s) (a number or ``(n,)``).
        Used by posterior predictives (model ATE, counterfactual group means).
        """
        n = len(labels)
        d = (
            np.stack([self.dosage_of(lab) for lab in labels])
            if self.n_perturbations
            else np.zeros((n, 0), np.float32)
        )
        index = {lab: i for i, lab in enumerate(self.labels)}
        codes = np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)
        cov = np.zeros(len(self.covariate_keys), dtype=np.int64) if covariate_codes is None else covariate_codes
        cov = np.tile(np.asarray(cov, dtype=np.int64).reshape(1, -1), (n, 1)).reshape(n, len(self.covariate_keys))
        library = np.broadcast_to(np.asarray(library, dtype=np.float32), (n,))
        device = torch.device(device)
        return Batch(
            x=None,
            d=torch.as_tensor(d, dtype=torch.float32, device=device),
            c=torch.as_tensor(cov, device=device),
            label=torch.as_tensor(codes, device=device),
            library=torch.as_tensor(np.array(library), device=device),  # a writable copy of the broadcast view
            index=torch.arange(n, device=device),
            n_cells=n,
        )

def split_label(label: str, control: str, separator: str) -> list[str]:
    """Components of a perturbation label; the control has none."""
    if label == control:
        return []
    parts = [p.strip() for p in str(label).split(separator)]
    if any(p == "" for p in parts):
        raise ValueError(
            f"perturbation label {label!r} has an empty component "
            f"(separator {separator!r})"
        )
    if control in parts:
        raise ValueError(
            f"perturbation label {label!r} combines the control label {control!r} with "
            "other perturbations; write the treated components alone"
        )
    return parts


def canonical_label(label: str, control: str, separator: str) -> str:
    """``"B+A"`` and ``"A+B"`` are the same combination: sort the components."""
    parts = split_label(label, control, separator)
    return control if not parts else separator.join(sorted(parts))


def _names(values: Sequence, limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


class PerturbationData:
    """Tensors for the models of the zoo, read from an AnnData (see module docstring).

    Build it with :meth:`from_anndata`; iterate minibatches with :meth:`batches`.
    """

    def __init__(
        self,
        adata,
        counts,
        dosage: sp.csr_matrix,
        labels: np.ndarray,
        covariates: np.ndarray,
        library: np.ndarray,
        split: np.ndarray,
        spec: DataSpec,
    ) -> None:
        self.adata = adata
        self.counts = counts
        self.dosage = dosage
        self.labels = labels
        self.covariates = covariates
        self.library = library
        self.split = split
        self.spec = spec

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_anndata(
        cls,
        adata,
        perturbation_key: str = "perturbation",
        control: str = "control",
        covariate_keys: Sequence[str] = (),
        layer: str | None = None,
        split_key: str = "split",
        combination_separator: str = "+",
        dose_key: str | None = None,
        spec: DataSpec | None = None,
        seed: int = 0,
        require_expressed_genes: bool | None = None,
        heldout_control_fraction: float = HELDOUT_CONTROL_FRACTION,
    ) -> "PerturbationData":
        """Validate and encode ``adata``.

        Args:
            adata: an AnnData (in memory or opened with ``backed="r"``).
            perturbation_key: ``obs`` column of perturbation labels.
            control: the control label in that column.
            covariate_keys: categorical ``obs`` columns used as covariates.
            layer: read counts from ``adata.layers[layer]`` instead of ``adata.X``.
            split_key: ``obs`` column with ``train``/``val``/``test``; when absent a
                seeded random 64/16/20 cell split is drawn. A column that keeps every
                control cell in training while holding other cells out gets
                ``heldout_control_fraction`` of the controls moved to ``test`` (``val``
                without test cells), with a warning when building a new vocabulary
                (:func:`~pyro_perturb.data.splits.hold_out_controls`).
            combination_separator: separator of combination labels (``"A+B"``).
            dose_key: optional ``obs`` column of doses: a number scales every component,
                a string such as ``"1.0+0.5"`` gives one dose per component.
            spec: the vocabulary of a trained model. When given, the data is encoded
                with it (prediction/evaluation) and anything unknown is refused; the
                other vocabulary arguments default to the spec's.
            seed: seed of the random split.
            require_expressed_genes: refuse genes with zero counts in every cell
                (default: True when building a new vocabulary, False with ``spec``).
            heldout_control_fraction: see ``split_key`` (0 keeps the column as given);
                seeded by ``seed``.

        Gene names must be unique and counts finite non-negative integers up to
        :data:`MAX_COUNT`. Building a new vocabulary (``spec=None``, i.e. training data),
        a random split needs at least :data:`MIN_CELLS_RANDOM_SPLIT` cells, and a split
        column without ``val`` or ``test`` cells is accepted with a warning saying what
        it implies.
        """
        if not hasattr(adata, "obs") or not hasattr(adata, "X"):
            raise ValueError(f"expected an AnnData object, got {type(adata).__name__}")
        if spec is not None:
            perturbation_key = spec.perturbation_key
            control = spec.control
            combination_separator = spec.separator
            covariate_keys = spec.covariate_keys
            layer = spec.layer if layer is None else layer
            dose_key = spec.dose_key if dose_key is None else dose_key
        if require_expressed_genes is None:
            require_expressed_genes = spec is None
        covariate_keys = list(covariate_keys)
        n_cells, n_genes = adata.shape
        if n_cells == 0:
            raise ValueError("the AnnData has no cells (n_obs = 0)")
        if n_genes == 0:
            raise ValueError("the AnnData has no genes (n_vars = 0)")
        _check_columns(adata.obs, perturbation_key, covariate_keys, dose_key)

        labels = _encode_labels(adata, perturbation_key, control, combination_separator, spec)
        dosage = _encode_dosage(adata.obs, labels, control, combination_separator, dose_key)
        cov_codes, categories = _encode_covariates(adata.obs, covariate_keys, spec)
        counts, genes, library = _encode_counts(adata, layer, spec, require_expressed_genes)
        split = _encode_split(adata.obs, split_key, n_cells, seed, new_vocabulary=spec is None)
        if split_key is not None and split_key in adata.obs.columns:  # the user's column: controls held out?
            cell_labels = np.asarray(labels.canonical, dtype=object)[labels.inverse]
            split = hold_out_controls(split, cell_labels, control, heldout_control_fraction, seed, warn=spec is None)

        new_spec = DataSpec(
            genes=genes,
            perturbations=labels.perturbations,
            labels=labels.labels,
            covariate_keys=covariate_keys,
            covariate_categories=categories,
            control=control,
            separator=combination_separator,
            perturbation_key=perturbation_key,
            layer=layer,
            dose_key=dose_key,
        )
        return cls(adata, counts, dosage, labels.codes, cov_codes, library, split, new_spec)

    # ------------------------------------------------------------------ access
    @property
    def n_cells(self) -> int:
        return self.library.shape[0]

    def indices(self, split: str | None = None) -> np.ndarray:
        """Cell indices of a split (``None``: all cells)."""
        if split is None:
            return np.arange(self.n_cells)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(self.split == split)

    def label_names(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Canonical perturbation label of each cell (``idx``: a subset)."""
        raw = self.adata.obs[self.spec.perturbation_key].astype(str).str.strip().to_numpy()
        if idx is not None:
            raw = raw[idx]
        return np.array([canonical_label(r, self.spec.control, self.spec.separator) for r in raw])

    def read_counts(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 counts ``(len(idx), G)`` of the given cells, rows in the order of ``idx``."""
        idx = np.asarray(idx)
        if np.all(idx[:-1] <= idx[1:]):
            return _read_rows(self.counts, idx)
        # reading sorted rows is what h5py and CSR slicing do fastest; then un-permute
        order = np.argsort(idx, kind="stable")
        rows = _read_rows(self.counts, idx[order])
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def batch(
        self,
        idx: np.ndarray,
        n_cells: int | None = None,
        positions: np.ndarray | None = None,
        device: torch.device | str = "cpu",
    ) -> Batch:
        """One :class:`Batch` of the cells ``idx``, row ``i`` being cell ``idx[i]``.

        ``n_cells`` is the size of the population the batch is drawn from (the cell
        plate's size: the likelihood is scaled by ``n_cells / len(idx)``); ``positions``
        ``(len(idx),)`` are the cells' positions in that population (the plate's
        subsample indices; default ``0..len(idx)-1``).
        """
        idx = np.asarray(idx)
        positions = np.arange(len(idx)) if positions is None else np.asarray(positions)
        if positions.shape != idx.shape:
            raise ValueError(f"positions has shape {positions.shape}; expected one per cell, {idx.shape}")
        device = torch.device(device)
        x = torch.from_numpy(self.read_counts(idx))
        d = torch.from_numpy(np.asarray(self.dosage[idx].todense(), dtype=np.float32))
        return Batch(
            x=x.to(device),
            d=d.to(device),
            c=torch.from_numpy(self.covariates[idx]).to(device),
            label=torch.from_numpy(self.labels[idx]).to(device),
            library=torch.from_numpy(self.library[idx]).to(device),
            index=torch.from_numpy(positions.astype(np.int64)).to(device),
            n_cells=int(n_cells if n_cells is not None else len(idx)),
        )

    def batches(
        self,
        split: str | None = "train",
        batch_size: int = 512,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        indices: np.ndarray | None = None,
        block_size: int | None = None,
        buffer_blocks: int = 16,
        shard: tuple[int, int] | None = None,
        start_step: int = 0,
    ) -> Iterator[Batch]:
        """Minibatches covering a split once.

        ``shuffle=True`` (training) visits the cells in a random order drawn from
        ``seed`` (see :func:`epoch_order`; ``block_size`` switches to block-shuffling,
        faster to read from disk); ``shuffle=False`` (evaluation) visits every cell once
        in order. The plate size of every batch is the number of cells in the split.

        ``shard=(rank, world_size)`` (data-parallel training) keeps rank ``rank``'s
        share of every batch of ``batch_size`` cells: ``batch_size // world_size``
        contiguous cells of it, so the ranks' batches are disjoint and together form the
        single-process batch; the last batch is cut to a multiple of ``world_size``
        (at most ``world_size - 1`` cells of the epoch are dropped). ``start_step``
        skips the first batches without reading them (resuming mid-epoch).
        """
        idx = self.indices(split) if indices is None else np.asarray(indices)
        if len(idx) == 0:
            return
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shard is not None:
            rank, world = shard
            if not 0 <= rank < world:
                raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
            if batch_size % world:
                raise ValueError(
                    f"batch_size {batch_size} is not a multiple of the number of processes {world}"
                )
        positions = epoch_order(len(idx), seed, block_size, buffer_blocks) if shuffle else np.arange(len(idx))
        for start in range(start_step * batch_size, len(idx), batch_size):
            pos = positions[start : start + batch_size]
            if shard is not None:
                per_rank = len(pos) // world
                if per_rank == 0:
                    continue
                pos = pos[rank * per_rank : (rank + 1) * per_rank]
            # a minibatch is a set of cells: list them in file order (sorted rows are read
            # fastest; the row order fixes which random draws go to which cell, so it is
            # part of what the seed reproduces)
            pos = pos[np.argsort(idx[pos], kind="stable")]
            yield self.batch(idx[pos], n_cells=len(idx), positions=pos, device=device)

    def gene_stats(self, split: str | None = "train") -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of ``log1p(counts)`` per gene over a split.

        The encoders standardise their input with these (computed on training cells
        only, streamed in chunks).
        """
        idx = self.indices(split)
        if len(idx) == 0:
            idx = np.arange(self.n_cells)
        total = np.zeros(self.counts.shape[1])
        total_sq = np.zeros(self.counts.shape[1])
        for start in range(0, len(idx), _CHUNK):
            rows = np.log1p(_read_rows(self.counts, idx[start : start + _CHUNK]).astype(np.float64))
            total += rows.sum(0)
            total_sq += (rows**2).sum(0)
        mean = total / len(idx)
        std = np.sqrt(np.maximum(total_sq / len(idx) - mean**2, 0.0))
        return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)

    def __repr__(self) -> str:
        counts = {s: int((self.split == s).sum()) for s in SPLITS}
        return (
            f"PerturbationData({self.n_cells} cells x {self.spec.n_genes} genes, "
            f"{self.spec.n_perturbations} perturbations, {self.spec.n_labels} labels, "
            f"covariates {self.spec.covariate_keys}, split {counts})"
        )


# ------------------------------------------------------------ encoding steps of from_anndata
# Each step reads one field of the AnnData, validates it and encodes it; they run in this
# order, so that of several problems the first one reported does not depend on the refactoring.
def _check_columns(obs, perturbation_key: str, covariate_keys: list[str], dose_key: str | None) -> None:
    """Every ``obs`` column the encoding reads exists."""
    for key, role in [(perturbation_key, "perturbation")] + [
        (k, "covariate") for k in covariate_keys
    ] + ([(dose_key, "dose")] if dose_key else []):
        if key not in obs.columns:
            raise ValueError(
                f"{role} column {key!r} not found in adata.obs; "
                f"available columns: {_names(obs.columns, 20)}"
            )


class _EncodedLabels(NamedTuple):
    """The perturbation column, encoded (n: cells, U: distinct raw labels)."""

    raw: np.ndarray  # (n,) object: each cell's label, stripped
    inverse: np.ndarray  # (n,) int: index of each cell's raw label among the U
    canonical: list[str]  # (U,) canonical form of each distinct raw label
    perturbations: list[str]  # vocabulary of single perturbations
    labels: list[str]  # vocabulary of full labels, control first
    codes: np.ndarray  # (n,) int64 label code per cell; -1: a label outside the vocabulary


def _encode_labels(adata, perturbation_key: str, control: str, separator: str, spec: DataSpec | None) -> _EncodedLabels:
    """Read, validate and canonicalise ``obs[perturbation_key]``; build or apply the vocabularies."""
    raw = adata.obs[perturbation_key]
    missing = raw.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"obs[{perturbation_key!r}] has {int(missing.sum())} missing values "
            f"(first at cell {adata.obs_names[np.argmax(missing)]!r}); label every "
            f"cell, controls with {control!r}"
        )
    if isinstance(raw.dtype, pd.CategoricalDtype):
        # millions of cells: strip the few categories, not one string per cell (the
        # per-cell array then holds references to the shared category strings)
        categories = np.asarray(raw.cat.categories.astype(str).str.strip(), dtype=object)
        raw = categories[raw.cat.codes.to_numpy()]
    else:
        raw = raw.astype(str).str.strip().to_numpy()
    empty = raw == ""
    if empty.any():
        raise ValueError(
            f"obs[{perturbation_key!r}] has {int(empty.sum())} empty labels (first at "
            f"cell {adata.obs_names[np.argmax(empty)]!r})"
        )
    uniques, inverse = np.unique(raw, return_inverse=True)
    canon_of_unique = [canonical_label(u, control, separator) for u in uniques]

    if spec is None:
        if control not in set(canon_of_unique):
            raise ValueError(
                f"control label {control!r} not found in obs[{perturbation_key!r}]; "
                f"labels seen: {_names(uniques, 10)}. Pass the right one with "
                "control=... (--control on the command line)"
            )
        singles = sorted({p for lab in canon_of_unique for p in split_label(lab, control, separator)})
        labels = [control] + sorted({lab for lab in canon_of_unique if lab != control})
    else:
        singles, labels = list(spec.perturbations), list(spec.labels)
        known = set(singles)
        unknown = sorted(
            {p for lab in canon_of_unique for p in split_label(lab, control, separator) if p not in known}
        )
        if unknown:
            raise ValueError(
                f"obs[{perturbation_key!r}] holds perturbations the model never learned: "
                f"{_names(unknown)}. Known perturbations: {_names(singles, 10)}"
            )
    label_index = {lab: i for i, lab in enumerate(labels)}
    # a combination of known singles that the vocabulary has no label for gets -1
    label_codes = np.array([label_index.get(c, -1) for c in canon_of_unique], dtype=np.int64)
    return _EncodedLabels(raw, inverse, canon_of_unique, singles, labels, label_codes[inverse])


def _encode_dosage(obs, labels: _EncodedLabels, control: str, separator: str, dose_key: str | None) -> sp.csr_matrix:
    """Dosage ``(n_cells, T)``: multi-hot over the single perturbations, scaled by doses."""
    n_cells = len(labels.raw)
    single_index = {p: i for i, p in enumerate(labels.perturbations)}
    # components in the order each label is written, so that a per-component dose
    # ("1.0+0.5") goes to the component written at its position ("B+A": B gets 1.0)
    first_cell = np.full(len(labels.canonical), -1, dtype=np.int64)
    first_cell[labels.inverse[::-1]] = np.arange(len(labels.inverse))[::-1]
    parts_of_unique = [
        split_label(labels.raw[i], control, separator) if i >= 0 else split_label(c, control, separator)
        for i, c in zip(first_cell, labels.canonical)
    ]
    # vectorised over cells: each cell repeats the single-perturbation columns of
    # its unique label (this runs on millions of cells)
    unique_cols = [np.array([single_index[p] for p in parts], dtype=np.int64) for parts in parts_of_unique]
    n_parts = np.array([len(c) for c in unique_cols], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_parts)[:-1]])
    flat_cols = np.concatenate(unique_cols) if n_parts.sum() else np.zeros(0, dtype=np.int64)
    inverse = labels.inverse
    lens = n_parts[inverse]
    total = int(lens.sum())
    rows = np.repeat(np.arange(n_cells), lens)
    within = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
    cols = flat_cols[np.repeat(offsets[inverse], lens) + within]
    vals = _read_doses(obs, dose_key, separator, lens, labels.raw, total)
    dosage = sp.csr_matrix(
        (vals, (rows, cols)),
        shape=(n_cells, len(labels.perturbations)),
    )
    dosage.sum_duplicates()
    return dosage


def _encode_covariates(obs, covariate_keys: list[str], spec: DataSpec | None) -> tuple[np.ndarray, list[list[str]]]:
    """Codes ``(n_cells, len(covariate_keys))`` of the covariate columns, and each key's categories."""
    cov_codes = np.zeros((len(obs), len(covariate_keys)), dtype=np.int64)
    categories: list[list[str]] = []
    for k, key in enumerate(covariate_keys):
        col = obs[key]
        if col.isna().any():
            raise ValueError(
                f"covariate column {key!r} has {int(col.isna().sum())} missing values"
            )
        values = col.astype(str).to_numpy()
        if spec is None:
            cats = sorted(set(values))
        else:
            cats = list(spec.covariate_categories[k])
            unknown = sorted(set(values) - set(cats))
            if unknown:
                raise ValueError(
                    f"covariate column {key!r} holds values the model never saw: "
                    f"{_names(unknown)}; known: {_names(cats, 10)}"
                )
        cov_codes[:, k] = pd.Categorical(values, categories=cats).codes
        categories.append(cats)
    return cov_codes, categories


def _encode_counts(adata, layer: str | None, spec: DataSpec | None, require_expressed_genes: bool):
    """The count matrix (as rows are read from it), the gene names and each cell's library size.

    Checks the genes (unique names, the spec's genes in its order) and every value
    (finite, non-negative integers up to :data:`MAX_COUNT`), chunk by chunk.
    """
    if layer is not None:
        if layer not in adata.layers.keys():
            raise ValueError(
                f"layer {layer!r} not found; available layers: {_names(adata.layers.keys())}"
            )
        counts = adata.layers[layer]
    else:
        counts = adata.X
    if counts is None:
        raise ValueError("adata.X is empty (None); pass layer=... to read counts from a layer")
    genes = [str(g) for g in adata.var_names]
    names = pd.Index(genes)
    if not names.is_unique:
        # prediction and the ATE tables address genes by name
        duplicated = sorted(set(names[names.duplicated()]))
        raise ValueError(
            f"gene names (adata.var_names) are not unique: {_names(duplicated)} appear more than "
            "once. Make them unique first, e.g. adata.var_names_make_unique()"
        )
    if spec is not None and genes != list(spec.genes):
        missing_genes = [g for g in spec.genes if g not in set(genes)]
        if missing_genes:
            raise ValueError(
                f"the data lacks {len(missing_genes)} genes the model was trained on: "
                f"{_names(missing_genes)}"
            )
        raise ValueError(
            "the data's genes differ from the model's (extra genes or another order); "
            "subset and order them as the model's: adata[:, genes]"
        )
    counts = _row_source(counts)
    n_cells, n_genes = adata.shape
    library, gene_totals = _scan_counts(counts, n_cells, n_genes, genes)
    if require_expressed_genes and (gene_totals == 0).any():
        zero = [genes[g] for g in np.flatnonzero(gene_totals == 0)]
        raise ValueError(
            f"{len(zero)} genes have zero counts in every cell: {_names(zero)}. "
            "Remove them first, e.g. adata = adata[:, adata.X.sum(0).A1 > 0]"
        )
    if (library == 0).any():
        first = adata.obs_names[int(np.argmax(library == 0))]
        raise ValueError(
            f"{int((library == 0).sum())} cells have zero total counts (first: {first!r}); "
            "remove empty cells"
        )
    return counts, genes, library


# what a split without cells means for training and evaluation
_EMPTY_SPLIT_CONSEQUENCE = {
    "val": "early stopping and the choice of the best epoch use the training loss instead",
    "test": "evaluation will report no test metrics (iwelbo: null)",
}


def _encode_split(obs, split_key: str | None, n_cells: int, seed: int, new_vocabulary: bool) -> np.ndarray:
    """``train``/``val``/``test`` per cell: ``obs[split_key]`` when present, else a seeded random split.

    ``new_vocabulary`` (training data): a random split needs every part non-empty (at
    least :data:`MIN_CELLS_RANDOM_SPLIT` cells); a split column without ``val`` or
    ``test`` cells is kept, with a warning that says what that implies (a column
    without ``train`` cells is refused by training itself).
    """
    if split_key is not None and split_key in obs.columns:
        split = obs[split_key].astype(str).to_numpy()
        bad = sorted(set(split) - set(SPLITS))
        if bad:
            raise ValueError(
                f"obs[{split_key!r}] may only hold {SPLITS}; found {_names(bad)}"
            )
        if new_vocabulary:
            for name, consequence in _EMPTY_SPLIT_CONSEQUENCE.items():
                if not (split == name).any():
                    warnings.warn(f"obs[{split_key!r}] has no {name!r} cells: {consequence}", UserWarning, stacklevel=3)
        return split
    if new_vocabulary and n_cells < MIN_CELLS_RANDOM_SPLIT:
        raise ValueError(
            f"{n_cells} cells are too few to split: a random 64/16/20 train/val/test split needs at "
            f"least {MIN_CELLS_RANDOM_SPLIT} cells to give each part one; add cells or give a "
            "split column" + (f" (obs[{split_key!r}])" if split_key is not None else "")
        )
    return random_split(n_cells, seed=seed)


# ---------------------------------------------------------------------------- helpers
def _read_doses(obs, dose_key, separator, lens, raw, total) -> np.ndarray:
    """Dose of every (cell, component) entry of the dosage matrix, in row order."""
    if not dose_key:
        return np.ones(total, dtype=np.float32)
    col = obs[dose_key]
    treated = lens > 0
    if pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy(dtype=np.float64)
        bad = treated & ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"dose column {dose_key!r} has a non-finite value {values[i]!r} (cell {obs.index[i]!r})")
        bad = treated & (values < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"dose column {dose_key!r} has a negative value {values[i]!r} (cell {obs.index[i]!r})")
        return np.repeat(values, lens).astype(np.float32)
    out = []
    values = col.to_numpy()
    for i in np.flatnonzero(treated):
        v, n = values[i], lens[i]
        try:
            doses = [float(t) for t in str(v).split(separator)]
        except ValueError:
            raise ValueError(f"dose column {dose_key!r} has a non-numeric value {v!r} (cell {obs.index[i]!r})") from None
        if len(doses) == 1:
            doses = doses * n
        elif len(doses) != n:
            raise ValueError(
                f"dose {v!r} of cell {obs.index[i]!r} has {len(doses)} components "
                f"but its perturbation {raw[i]!r} has {n}"
            )
        if not np.all(np.isfinite(doses)):
            raise ValueError(f"dose column {dose_key!r} has a non-finite value {v!r} (cell {obs.index[i]!r})")
        if any(d < 0 for d in doses):
            raise ValueError(f"dose column {dose_key!r} has a negative value {v!r} (cell {obs.index[i]!r})")
        out.extend(doses)
    return np.asarray(out, dtype=np.float32)


def epoch_order(n: int, seed: int, block_size: int | None = None, buffer_blocks: int = 16) -> np.ndarray:
    """A random order ``(n,)`` of the positions ``0..n-1`` for one training epoch.

    ``block_size=None``: a uniform random permutation. Otherwise *block-shuffling*, for
    data read from disk: the positions are cut into blocks of ``block_size``
    consecutive cells, the blocks are put in random order, and the cells are shuffled
    within windows of ``buffer_blocks`` consecutive blocks of that order. Every cell is
    still visited once per epoch, but a minibatch holds cells of at most about
    ``buffer_blocks + 1`` blocks, which backed reads fetch as a few contiguous slices
    instead of one read per cell. The price: cells of a block (neighbours in the file)
    tend to share minibatches, so the gradient noise is larger when the file is sorted
    (e.g. by perturbation); use a window of many batches or shuffle the file once.
    """
    rng = np.random.default_rng(seed)
    if not block_size:
        return rng.permutation(n)
    if block_size < 1 or buffer_blocks < 1:
        raise ValueError(f"block_size and buffer_blocks must be >= 1, got {block_size} and {buffer_blocks}")
    starts = rng.permutation(np.arange(0, n, block_size))
    order = (starts[:, None] + np.arange(block_size)[None, :]).ravel()
    order = order[order < n]
    # windows end after every buffer_blocks-th block (the last block may be short)
    ends = np.cumsum(np.minimum(block_size, n - starts))
    bounds = np.concatenate([[0], ends[buffer_blocks - 1 :: buffer_blocks], [n]])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rng.shuffle(order[lo:hi])  # in place, on a view
    return order


# rows of backed data within this distance of each other are read as one slice (one
# HDF5 read costs about as much as reading a few dozen rows more)
_MAX_ROW_GAP = 16


class BackedCSRRows:
    """Rows of a CSR matrix stored in an HDF5 group (anndata's backed ``X`` or layer),
    read with h5py: ``rows[lo:hi]`` is one contiguous read of ``data`` and ``indices``.

    anndata's own backed indexing re-reads the whole ``indptr`` on each access (slow for
    millions of cells); here ``indptr`` (8 bytes a cell) is read once and kept.
    """

    def __init__(self, group) -> None:
        self.group = group
        self.data = group["data"]
        self.indices = group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape = tuple(int(v) for v in group.attrs["shape"])

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("BackedCSRRows reads contiguous row slices only")
        lo, hi, _ = rows.indices(self.shape[0])
        hi = max(hi, lo)
        first, last = int(self.indptr[lo]), int(self.indptr[hi])
        return sp.csr_matrix(
            (self.data[first:last], self.indices[first:last], self.indptr[lo : hi + 1] - first),
            shape=(hi - lo, self.shape[1]),
        )


def _row_source(counts):
    """What rows are read from: anndata's backed CSR matrices through :class:`BackedCSRRows`."""
    group = getattr(counts, "group", None)
    if group is not None and getattr(counts, "format", None) == "csr" and {"data", "indices", "indptr"} <= set(group):
        return BackedCSRRows(group)
    return counts


def _read_rows(counts, idx: np.ndarray) -> np.ndarray:
    """Dense float32 rows of a dense, sparse or backed matrix; ``idx`` sorted."""
    if isinstance(counts, np.ndarray) or sp.issparse(counts):
        rows = counts[idx]
    elif not isinstance(counts, BackedCSRRows) and len(idx) and 2 * len(idx) > idx[-1] - idx[0] + 1:
        rows = counts[int(idx[0]) : int(idx[-1]) + 1][idx - idx[0]]  # dense enough: one slice
    elif not isinstance(counts, BackedCSRRows):
        rows = counts[idx]  # other backed kinds: their own indexing
    else:
        # backed CSR on disk: read runs of nearby rows as contiguous slices (a block-
        # shuffled batch is a few runs; a uniformly shuffled one, one read per cell)
        idx = np.asarray(idx)
        if len(idx) == 0:
            return np.zeros((0, counts.shape[1]), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(idx) > _MAX_ROW_GAP) + 1
        rows = sp.vstack(
            [counts[int(run[0]) : int(run[-1]) + 1][run - run[0]] for run in np.split(idx, breaks)], format="csr"
        )
    return np.ascontiguousarray(_dense(rows))


def _dense(rows) -> np.ndarray:
    """float32 ndarray of a block of rows read from any kind of counts matrix."""
    if hasattr(rows, "to_memory"):  # anndata backed sparse
        rows = rows.to_memory()
    if sp.issparse(rows):
        rows = rows.toarray()
    return np.asarray(rows, dtype=np.float32)


def _scan_counts(counts, n_cells: int, n_genes: int, genes: list[str]):
    """Check counts chunk by chunk; return library sizes and per-gene totals."""
    library = np.zeros(n_cells, dtype=np.float32)
    gene_totals = np.zeros(n_genes, dtype=np.float64)
    for start in range(0, n_cells, _CHUNK):
        stop = min(start + _CHUNK, n_cells)
        block = counts[start:stop]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            values = block.data
        elif hasattr(block, "to_memory"):
            block = sp.csr_matrix(block.to_memory())
            values = block.data
        else:
            block = np.asarray(block)
            values = block
        if values.size:
            finite = np.isfinite(values)
            if not finite.all():
                raise ValueError(
                    f"counts contain NaN or infinite values ({int((~finite).sum())} "
                    f"in cells {start}..{stop - 1})"
                )
            if (values < 0).any():
                raise ValueError(
                    f"counts contain negative values (min {values.min()}) in cells "
                    f"{start}..{stop - 1}; pyro-perturb models raw UMI counts"
                )
            if not np.all(values == np.round(values)):
                bad = values[values != np.round(values)][0]
                raise ValueError(
                    f"counts must be integers; found {bad} in cells {start}..{stop - 1}. "
                    "Pass raw counts (layer=... if adata.X holds normalised data)"
                )
            if (values > MAX_COUNT).any():
                raise ValueError(
                    f"counts above {MAX_COUNT:,} (2**24, the largest integer float32 training "
                    f"represents exactly) are refused; found {values.max():g} in cells "
                    f"{start}..{stop - 1}. Pass raw UMI counts"
                )
        library[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        gene_totals += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
    return library, gene_totals
