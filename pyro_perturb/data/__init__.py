"""Data layer: AnnData -> tensors, minibatches, splits and simulators with ground truth."""

from .anndata import DataSpec, PerturbationData, canonical_label, epoch_order, split_label
from .batch import Batch
from . import simulate, splits

__all__ = [
    "Batch",
    "DataSpec",
    "PerturbationData",
    "canonical_label",
    "epoch_order",
    "split_label",
    "simulate",
    "splits",
]
