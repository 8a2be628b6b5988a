"""The minibatch every model and guide of the zoo takes as its single argument."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    """A minibatch of B cells, all tensors on one device.

    Attributes:
        x: ``(B, G)`` float counts, or ``None`` for posterior predictive without
            observations (guides then skip their local sites: locals come from the prior).
        d: ``(B, T)`` float dosage over the single-perturbation vocabulary.
        c: ``(B, K)`` long covariate codes (K may be 0).
        label: ``(B,)`` long code of each cell's full label (0 = control, -1 = a
            combination absent from the training vocabulary).
        library: ``(B,)`` float observed library size (total counts).
        index: ``(B,)`` long positions of the cells in their population, the
            subsample indices of the ``"cells"`` plate.
        n_cells: size of that population: the ``"cells"`` plate scales the batch's
            local terms by ``n_cells / B``.
        kl_weight: annealing weight of the latent sites (``poutine.scale``), in (0, 1].
    """

    x: torch.Tensor | None
    d: torch.Tensor
    c: torch.Tensor
    label: torch.Tensor
    library: torch.Tensor
    index: torch.Tensor
    n_cells: int
    kl_weight: float = 1.0

    @property
    def size(self) -> int:
        return self.d.shape[0]

    @property
    def device(self) -> torch.device:
        return self.d.device

    def to(self, device: torch.device | str) -> "Batch":
        return replace(
            self,
            **{
                k: getattr(self, k).to(device) if getattr(self, k) is not None else None
                for k in ("x", "d", "c", "label", "library", "index")
            },
        )

    def with_kl_weight(self, kl_weight: float) -> "Batch":
        return replace(self, kl_weight=float(kl_weight))

    @classmethod
    def from_tensors(
        cls,
        x: torch.Tensor,
        d: torch.Tensor,
        c: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
    ) -> "Batch":
        """A batch that is its own population (no minibatch scaling), for quick use."""
        n = x.shape[0]
        return cls(
            x=x,
            d=d,
            c=c if c is not None else x.new_zeros((n, 0), dtype=torch.long),
            label=label if label is not None else x.new_zeros(n, dtype=torch.long),
            library=library if library is not None else x.sum(-1),
            index=torch.arange(n, device=x.device),
            n_cells=n,
        )
