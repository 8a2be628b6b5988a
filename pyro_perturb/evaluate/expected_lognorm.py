"""The expected log-normalised expression of a cell, integrated over its count noise.

For a cell whose counts are independent ``x_h ~ NB(mean mu_h, inverse dispersion
theta_h)`` (or Poisson) over genes ``h = 1..G``, with total ``T = sum_h x_h``, this module
computes, for every gene ``g``, exactly up to a stated tolerance::

    m_g = E[ log2(1 + s * x_g / max(T, 1)) ]

the per-gene mean of ``lognormalize`` (the model ATE's statistic) over sampled cells with
those parameters. The model ATE averages that statistic over particles; computing it in closed form
for each particle's latent state removes all the count noise from the estimate (the
other noise, of the latents, remains).

Derivation. For ``x_g = 0`` the term is 0, whatever ``T`` (also ``T = 0``, which the
sampler clamps to 1). For ``k = x_g >= 1`` and ``R = T - x_g >= 0``, Frullani's integral
gives::

    ln(1 + s k / (k + R)) = ln((1 + s) k + R) - ln(k + R)
                          = int_0^inf (e^{-(k + R) t} - e^{-((1 + s) k + R) t}) dt / t

and the integrand is 0 at ``k = 0``. Taking the expectation inside (the integrand is
non-negative), with ``R`` independent of ``x_g`` and ``L_h(t) = E[exp(-t x_h)]`` the
Laplace transform of gene ``h``'s counts::

    m_g ln 2 = int_0^inf L_T(t) (1 - L_g((1 + s) t) / L_g(t)) dt / t,    L_T = prod_h L_h

    NB:       log L_h(t) = -theta_h log1p(mu_h (1 - e^{-t}) / theta_h)
    Poisson:  log L_h(t) = -mu_h (1 - e^{-t})

and ``L_g((1 + s) t) / L_g(t) = (1 + q)^{-theta_g}`` with ``q = (mu_g / theta_g) e^{-t}
(1 - e^{-s t}) / (1 + (mu_g / theta_g)(1 - e^{-t}))`` (Poisson: ``exp(-mu_g e^{-t} (1 -
e^{-s t}))``), computed without cancellation. The identity is exact (no moment matching
or truncation of the count distributions); ``L_T`` is shared by all genes of a cell.

Quadrature. In ``u = log t`` the integrand ``f(u) = L_T(t) (1 - (1 + q)^{-theta_g})`` is
smooth, rises like ``mu_g s t`` for small ``t`` and falls at least like ``e^{-t}``
(``f <= L_g(t) - P(x_g = 0) <= e^{-t}``), so the trapezoidal rule on the lattice ``u_j =
j h`` converges exponentially in ``1 / h``. Three errors, each kept to a fraction of
``tol`` (log2 units, absolute, per gene; together at most 0.4 ``tol`` in
bench/expected_lognorm_benchmark.py's sweep against exact summation):

* the step: ``h = 5 / (2 + log10(1 / tol))`` (0.625 at ``tol = 1e-6``); the error, measured
  against an exact enumeration, falls from ~1e-4 at ``h = 1`` to ~1e-6 at 0.7 and ~1e-9
  at 0.5;
* the left end: nodes start where ``(1 + s) t max_g(1 + mu_g (1 + 1 / theta_g)) <=
  sqrt(tol)``, below which ``f`` is linear in ``t`` to that relative accuracy, and the
  lattice is continued there as a geometric series (error ~``tol / 10``);
* the right end: a cell stops after the node where ``L_T(t) exp((1 - e^{-t}) max_g mu_g)
  (remaining nodes) h < tol ln2 / 10`` (a bound on ``L_T / L_g``, which is decreasing
  in ``t`` and bounds every later ``f``), and at ``t = ln(1 / tol) + 1`` at the latest
  (the ``e^{-t}`` bound).

Each cell's nodes depend only on that cell's parameters, so its result does not depend
on the other cells it is computed with, nor on chunking: bit for bit (the gene sums use
a fixed pairwise tree). Cost: ~20 nodes per cell at ``tol = 1e-4``, ~30 at 1e-6, whatever
the depth; three transcendental functions per node and gene (one for Poisson).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "expected_log_normalized",
    "expected_log_normalized_counts",
    "count_parameters",
    "quadrature_step",
    "exact_expected_log_normalized",
]

#: ``theta`` above this is Poisson to float precision (``theta = inf`` is clamped to it)
_THETA_POISSON = 1e15
#: log L_T below which a node is skipped (e^-60 ~ 1e-26: far below any tolerance, and
#: products with it stay clear of float32 subnormals)
_LOG_NEGLIGIBLE = -60.0
#: elements (cells x genes) per chunk (1 MB per float32 buffer; six buffers): larger
#: chunks amortise the per-node dispatch, smaller ones stay in cache
_CHUNK_ELEMENTS = 1 << 18


def quadrature_step(tol: float) -> float:
    """Trapezoidal step in ``log t`` for an absolute error of about ``tol / 10``."""
    return 5.0 / (2.0 + math.log10(1.0 / tol))


@torch.no_grad()
def expected_log_normalized(
    mean: torch.Tensor,
    theta: torch.Tensor | float | None = None,
    scale: float = 1e4,
    tol: float = 1e-6,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``E[log2(1 + scale * x_g / max(T, 1))]`` per gene, over independent counts
    ``x_h ~ NB(mean_h, theta_h)`` (Poisson if ``theta`` is None) and ``T = sum_h x_h``.

    The expectation is computed by a quadrature of an exact integral representation (see
    the module docstring): absolute error below ``tol`` (log2 units), plus float rounding
    (about 1e-6 in float32).

    Args:
        mean: ``(..., G)`` expected counts ``>= 0`` of each cell (e.g. ``l * rho`` with a
            per-cell library ``l`` in the leading dimensions); float32 or float64 (half
            precision is computed in float32).
        theta: NB inverse dispersion ``> 0``, broadcastable to ``mean`` (e.g. ``(G,)``);
            ``inf`` entries are Poisson; None: Poisson for every gene.
        scale: normalisation total ``s`` (1e4).
        tol: absolute error target, in ``(0, 0.01]``.
        chunk_elements: cells x genes computed at once (memory: about six float buffers
            of that size).

    Returns:
        ``(..., G)`` tensor on ``mean``'s device and dtype (no gradient).
    """
    if not isinstance(mean, torch.Tensor) or not mean.is_floating_point():
        raise ValueError(f"mean must be a floating-point tensor, got {type(mean).__name__}"
                         f"{'' if not isinstance(mean, torch.Tensor) else ' of dtype ' + str(mean.dtype)}")
    if mean.dim() < 1 or mean.shape[-1] < 1:
        raise ValueError(f"mean must have shape (..., G) with G >= 1, got {tuple(mean.shape)}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if not (0 < tol <= 0.01):
        raise ValueError(f"tol must be in (0, 0.01], got {tol}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    if not bool(torch.isfinite(mean).all()) or bool((mean < 0).any()):
        raise ValueError("mean must be finite and >= 0 (expected counts)")
    G = mean.shape[-1]
    dtype = mean.dtype
    if dtype not in (torch.float32, torch.float64):  # half precision: computed in float32
        mean = mean.float()
    flat = mean.reshape(-1, G)
    theta_rows = None  # theta as (cells, G), or theta_genes as (G,) shared by every cell
    theta_genes = None
    if theta is not None:
        theta = torch.as_tensor(theta, dtype=mean.dtype, device=mean.device)
        if bool(torch.isnan(theta).any()) or bool((theta <= 0).any()):
            raise ValueError("theta must be > 0 (inf: Poisson)")
        try:
            shape = torch.broadcast_shapes(theta.shape, mean.shape)
        except RuntimeError:
            raise ValueError(f"theta of shape {tuple(theta.shape)} does not broadcast with mean {tuple(mean.shape)}") from None
        if shape != mean.shape:
            raise ValueError(f"theta of shape {tuple(theta.shape)} would broadcast mean {tuple(mean.shape)} to {tuple(shape)}")
        # leading dimensions broadcast by expand (stride 0) hold no information: drop them
        while theta.dim() > 1 and (theta.shape[0] == 1 or theta.stride(0) == 0):
            theta = theta[0]
        theta = theta.clamp_max(_THETA_POISSON)
        if theta.dim() <= 1 or all(n == 1 for n in theta.shape[:-1]):
            theta_genes = theta.reshape(-1).expand(G).contiguous()
        else:
            theta_rows = theta.expand(mean.shape).reshape(-1, G)
    out = torch.empty_like(flat)
    rows = max(1, int(chunk_elements) // G)
    for start in range(0, flat.shape[0], rows):
        stop = min(start + rows, flat.shape[0])
        th = theta_genes if theta_rows is None else theta_rows[start:stop]
        out[start:stop] = _integrate(flat[start:stop], th, float(scale), float(tol))
    return out.reshape(mean.shape).to(dtype)


def count_parameters(fn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean, theta)`` of a count distribution over cells' gene vectors: a (possibly
    ``Independent``) ``NegativeBinomial`` (``theta`` = its ``total_count``; the compact
    ``(G,)`` one of :class:`~pyro_perturb.likelihoods.NegativeBinomialCounts`) or
    ``Poisson`` (``theta = None``). Raises ValueError for any other family."""
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if isinstance(base, torch.distributions.NegativeBinomial):
        return base.mean, getattr(base, "compact_total_count", base.total_count)
    if type(base).__name__.startswith("ZeroInflated"):
        raise ValueError(f"expected a NegativeBinomial or Poisson count distribution, got {type(base).__name__}: "
                         "the quadrature integrates independent NB or Poisson counts, not zero-inflated ones "
                         "(likelihood 'zinb'); draw counts instead")
    if isinstance(base, torch.distributions.Poisson):
        return base.rate, None
    raise ValueError(f"expected a NegativeBinomial or Poisson count distribution, got {type(base).__name__}")


def expected_log_normalized_counts(fn, scale: float = 1e4, tol: float = 1e-6) -> torch.Tensor:
    """:func:`expected_log_normalized` of a count distribution's cells (see
    :func:`count_parameters`): ``fn.batch_shape + fn.event_shape``, genes last."""
    mean, theta = count_parameters(fn)
    shape = fn.batch_shape + fn.event_shape
    return expected_log_normalized(mean.expand(shape), theta, scale=scale, tol=tol)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums of the last dimension of ``x`` (which it overwrites) by a fixed pairwise tree
    of elementwise additions: each row's sum is the same bits whatever the other rows
    (a matrix-vector product or ``sum`` may order a row's additions by the batch)."""
    width = x.shape[-1]
    while width > 1:
        half = width // 2
        x[..., :half] += x[..., width - half : width]
        width -= half
    return x[..., 0]


def _integrate(mu: torch.Tensor, theta: torch.Tensor | None, scale: float, tol: float) -> torch.Tensor:
    """The quadrature for a chunk: ``mu`` ``(C, G)``, ``theta`` ``(G,)``, ``(C, G)`` or
    None (Poisson). Returns ``(C, G)``."""
    h = quadrature_step(tol)
    stop_below = tol * math.log(2.0) / 10.0
    # left end of each cell: f is linear in t below (1 + s) t E[x^2] / E[x] <= sqrt(tol)
    if theta is None:
        second = 1.0 + mu.amax(-1)
    else:
        second = (1.0 + mu * (1.0 + 1.0 / theta)).amax(-1)
    u_first = math.log(math.sqrt(tol) / (1.0 + scale)) - second.log()
    j_first = torch.floor(u_first / h).to(torch.int64)
    j_last = math.ceil(math.log(math.log(1.0 / tol) + 1.0) / h)
    mu_max = mu.amax(-1)
    # the lattice left of a cell's first node, continued as f(u) ~ e^u: sum h e^{-kh}, k >= 0
    first_weight = h / -math.expm1(-h)
    active = torch.ones_like(mu_max, dtype=torch.bool)
    acc = torch.zeros_like(mu)
    buf = torch.empty_like(mu)
    if theta is None:
        mu_total = _row_sums(mu.clone())
    else:
        mu_over_theta = mu / theta
        neg_theta = -theta
        a = torch.empty_like(mu)
    for j in range(int(j_first.min()), j_last + 1):
        t = math.exp(j * h)
        c = -math.expm1(-t)  # 1 - e^{-t}
        w = math.exp(-t) * -math.expm1(-scale * t)  # e^{-t} - e^{-(1 + s) t}
        if theta is None:
            log_lt = mu_total * -c
            torch.mul(mu, -w, out=buf)  # log L_g((1+s)t) - log L_g(t)
        else:
            torch.mul(mu_over_theta, c, out=buf)
            torch.log1p(buf, out=a)
            log_lt = -_row_sums(a.mul_(theta))
            buf.add_(1.0)  # 1 + (mu / theta)(1 - e^{-t})
            torch.mul(mu_over_theta, w, out=a).div_(buf).log1p_()  # log1p(q)
            torch.mul(a, neg_theta, out=buf)
        buf.expm1_()  # -(1 - L_g((1+s)t) / L_g(t))
        started = j >= j_first
        weight = (started & active).to(mu.dtype) * h
        weight = torch.where(j_first == j, weight * (first_weight / h), weight)
        # nodes where L_T underflows contribute nothing; their subnormal products are slow
        coef = (weight * log_lt.exp()).neg_().masked_fill_(log_lt < _LOG_NEGLIGIBLE, 0.0)
        acc.addcmul_(buf, coef.unsqueeze(-1))
        # every later node's f is below L_T / L_g <= L_T e^{c mu_max} (log1p(x) <= x)
        remaining = j_last - j
        active &= ~(started & ((log_lt + c * mu_max).exp() * (remaining * h) < stop_below))
        if not bool(active.any()):
            break
    return acc.div_(math.log(2.0))


def exact_expected_log_normalized(
    mean: torch.Tensor, theta: torch.Tensor | None = None, scale: float = 1e4, mass: float = 1e-13
) -> torch.Tensor:
    """The same expectation for one cell by exact summation (a reference for tests and
    benchmarks; cost grows with the total count, so keep ``sum(mean)`` to ~1e4).

    Each gene's pmf is summed up to where its remaining mass is below ``mass``; the pmf
    of ``R_g = T - x_g`` is the convolution of the other genes' (by FFT, leave-one-out
    through prefix and suffix products); then ``m_g = sum_{k >= 1} P(x_g = k) sum_r
    P(R_g = r) log2(1 + scale k / (k + r))``. Computed in float64 on ``mean``'s device.

    Args:
        mean: ``(G,)`` expected counts.
        theta: ``(G,)`` NB inverse dispersion, or None (Poisson).
    """
    if mean.dim() != 1:
        raise ValueError(f"exact_expected_log_normalized takes one cell, mean of shape (G,); got {tuple(mean.shape)}")
    mu = mean.to(torch.float64)
    th = None if theta is None else torch.as_tensor(theta, dtype=torch.float64, device=mu.device).expand(mu.shape)
    pmfs = []
    for g in range(mu.shape[0]):
        m = mu[g]
        if m == 0:
            pmfs.append(torch.ones(1, dtype=torch.float64, device=mu.device))
            continue
        # the pmf's ratio p(k+1)/p(k) tends to r = m / (m + theta) (Poisson: 0) from above
        # (theta > 1) or below; past the mode the tail after K is below p(K) q / (1 - q)
        # with q = max(p(K)/p(K-1), r)
        limit = 0.0 if th is None else float(m / (m + th[g]))
        size = 16
        while True:
            k = torch.arange(size, dtype=torch.float64, device=mu.device)
            if th is None:
                log_p = k * m.log() - m - torch.lgamma(k + 1)
            else:
                t = th[g]
                log_p = (torch.lgamma(k + t) - torch.lgamma(t) - torch.lgamma(k + 1)
                         + t * torch.log(t / (t + m)) + k * torch.log(m / (t + m)))
            ratio = max(math.exp(float(log_p[-1] - log_p[-2])), limit)
            if ratio < 1.0 and float(log_p[-1].exp()) * ratio / (1.0 - ratio) < mass:
                break
            size *= 2
        pmfs.append(log_p.exp())
    n = 1 << math.ceil(math.log2(sum(len(p) for p in pmfs) + 1))
    spectra = torch.stack([torch.fft.rfft(p, n) for p in pmfs])
    ones = torch.ones_like(spectra[:1])
    before = torch.cat([ones, spectra[:-1]]).cumprod(0)
    after = torch.cat([spectra[1:], ones]).flip(0).cumprod(0).flip(0)
    rest = torch.fft.irfft(before * after, n).clamp_min(0.0)
    r = torch.arange(n, dtype=torch.float64, device=mu.device)
    out = torch.zeros_like(mu)
    for g, p in enumerate(pmfs):
        # terms of probability below 1e-18 change the sum by < 1e-18 * n * log2(1 + scale)
        k = torch.nonzero(p[1:] > 1e-18).squeeze(-1) + 1
        keep = rest[g] > 1e-18
        others, p_rest = r[keep], rest[g][keep]
        block = max(1, (1 << 22) // max(1, len(others)))  # values of x_g per (block, R) matrix
        for start in range(0, len(k), block):
            kk = k[start : start + block].to(torch.float64).unsqueeze(-1)
            out[g] += p[k[start : start + block]] @ (torch.log2(1.0 + scale * kk / (kk + others)) @ p_rest)
    return out
