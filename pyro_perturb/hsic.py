"""Differentiable kernel independence measures between two latent blocks (torch).

The numpy dHSIC test of :mod:`pyro_perturb.evaluate.metrics` scores a trained model; the
functions here are the training-time counterparts: they keep the autograd graph, so a
model can penalise or constrain the dependence between two blocks of its latents
(the comparative models' CO-cVAE, :mod:`pyro_perturb.models.comparative`).
"""

from __future__ import annotations

import torch


def gaussian_gram(x: torch.Tensor) -> torch.Tensor:
    """Gaussian kernel matrix ``(n, n)`` of the rows of ``x`` ``(n, d)``, median heuristic.

    ``k(a, b) = exp(-||a - b||^2 / median_{i<j} ||x_i - x_j||^2)`` (the numpy helper's
    bandwidth). The bandwidth is detached: it sets the kernel's scale, it is not optimised.
    """
    d2 = torch.cdist(x, x).pow(2)
    n = x.shape[0]
    off = d2.detach()[torch.triu_indices(n, n, offset=1, device=x.device).unbind(0)]
    med = off.median() if off.numel() else x.new_tensor(1.0)
    med = torch.where(med > 0, med, off.mean() if off.numel() else x.new_tensor(1.0))
    med = torch.where(med > 0, med, x.new_tensor(1.0))
    return torch.exp(-d2 / med)


def _centred(gram: torch.Tensor) -> torch.Tensor:
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Biased (V-statistic) HSIC between the rows of ``a`` ``(n, p)`` and ``b`` ``(n, q)``
    with Gaussian kernels: ``tr(K H L H) / n^2``, a scalar >= 0, differentiable."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"hsic needs the same rows in both blocks, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    return (_centred(gaussian_gram(a)) * gaussian_gram(b)).sum() / n**2


def unbiased_hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) between the rows of ``a`` ``(n, p)`` and
    ``b`` ``(n, q)``, Gaussian kernels, n >= 4: mean 0 for independent blocks (it can be
    slightly negative), unlike the V-statistic :func:`hsic`, whose null bias is of order
    ``1 / n`` and would dominate a minibatch."""
    n = a.shape[0]
    if b.shape[0] != n or n < 4:
        raise ValueError(f"unbiased_hsic needs the same n >= 4 rows in both blocks, got {tuple(a.shape)} and {tuple(b.shape)}")
    off = 1.0 - torch.eye(n, dtype=a.dtype, device=a.device)
    k, l = gaussian_gram(a) * off, gaussian_gram(b) * off
    kl = k @ l
    value = kl.trace() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 * kl.sum() / (n - 2)
    return value / (n * (n - 3))


def normalized_hsic(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``HSIC_u(a, b) / sqrt(HSIC_u(a, a) HSIC_u(b, b))`` with the unbiased estimator
    (:func:`unbiased_hsic`): about 0 for independent blocks whatever n, up to 1 when each
    block is a function of the other through the kernels. Scale free, so a constraint
    level on it reads the same whatever the latents' sizes and scales."""
    cross = unbiased_hsic(a, b)
    return cross / torch.sqrt(unbiased_hsic(a, a).clamp(min=0) * unbiased_hsic(b, b).clamp(min=0) + eps)


__all__ = ["gaussian_gram", "hsic", "normalized_hsic", "unbiased_hsic"]
