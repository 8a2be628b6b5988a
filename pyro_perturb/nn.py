"""Shared neural building blocks: MLPs, Gaussian encoders, expression normalisation.

Every tensor these modules create comes from their inputs' device and dtype, so models
built from them run on CUDA as on CPU (see ``tests/devices.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """``in_dim -> hidden... -> out_dim`` with ReLU (or LeakyReLU) between layers.

    Works on inputs of any leading shape ``(..., in_dim)``, particle dimensions included.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        activation: str = "relu",
        dropout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden]
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if layer_norm:
                layers.append(nn.LayerNorm(b))
            layers.append(nn.LeakyReLU(0.2) if activation == "leaky_relu" else nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dims[-1], out_dim))
        super().__init__(*layers)

    def forward_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``self(cat(parts, -1))`` without building the concatenation.

        The first ``Linear`` is applied to each part with its block of weight columns and
        the results are added (same math, float rounding aside), so a part without the
        particle dimensions of another (a cell's expression ``(B, G)`` next to a
        per-particle offset ``(P, B, L)``) is multiplied once, not once per particle.

        Args:
            parts: tensors whose last sizes add up to ``in_dim`` and whose leading
                dimensions broadcast, in the order of the concatenation.
        Returns:
            ``(*broadcast leading dims, out_dim)``.
        """
        first = self[0]
        widths = [p.shape[-1] for p in parts]
        if sum(widths) != first.in_features:
            raise ValueError(f"parts of widths {widths} do not add up to the MLP's input size {first.in_features}")
        hidden, start = None, 0
        for part, width in zip(parts, widths):
            block = first.weight[:, start : start + width]
            # the bias goes with the first part: the cell-level one when it comes first
            term = F.linear(part, block, first.bias if hidden is None else None)
            hidden = term if hidden is None else hidden + term
            start += width
        for layer in list(self)[1:]:
            hidden = layer(hidden)
        return hidden


class GaussianEncoder(nn.Module):
    """``input -> (loc, scale)`` of a diagonal Normal over ``out_dim`` latents."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, **mlp_kwargs) -> None:
        super().__init__()
        self.net = MLP(in_dim, hidden, 2 * out_dim, **mlp_kwargs)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._loc_scale(self.net(inputs))

    def forward_parts(self, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``self(cat(parts, -1))`` computed by :meth:`MLP.forward_parts`."""
        return self._loc_scale(self.net.forward_parts(parts))

    @staticmethod
    def _loc_scale(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = out.chunk(2, dim=-1)
        # softplus keeps the scale positive; the floor keeps log q finite early in training
        return loc, F.softplus(raw_scale) + 1e-4


class ExpressionNormalizer(nn.Module):
    """``log1p(x)`` standardised with training-set gene means and stds (buffers).

    Args:
        n_genes: G.
        gene_mean, gene_std: ``(G,)`` statistics of ``log1p(x)`` on training cells
            (:meth:`PerturbationData.gene_stats`); zeros/ones when omitted, then
            restored from a checkpoint.
    """

    def __init__(self, n_genes: int, gene_mean=None, gene_std=None) -> None:
        super().__init__()
        mean = torch.zeros(n_genes) if gene_mean is None else torch.as_tensor(gene_mean, dtype=torch.float32)
        std = torch.ones(n_genes) if gene_std is None else torch.as_tensor(gene_std, dtype=torch.float32)
        self.register_buffer("gene_mean", mean.clone())
        self.register_buffer("gene_std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.log1p(x) - self.gene_mean) / self.gene_std


def covariate_onehot(c: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``(B, K)`` codes -> ``(B, sum(sizes))`` concatenated one-hot encodings."""
    if len(sizes) == 0:
        return c.new_zeros((c.shape[0], 0), dtype=torch.float32)
    return torch.cat(
        [F.one_hot(c[:, k], int(n)).to(torch.float32) for k, n in enumerate(sizes)], dim=-1
    )


def broadcast_cat(tensors: Sequence[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """Concatenate along the last dim after broadcasting the leading (particle) dims.

    ``z`` of shape ``(P, B, L)`` and ``d`` of shape ``(B, T)`` give ``(P, B, L + T)``.
    """
    assert dim == -1, "only the last dimension is supported"
    shape = torch.broadcast_shapes(*[t.shape[:-1] for t in tensors])
    return torch.cat([t.expand(*shape, t.shape[-1]) for t in tensors], dim=-1)
