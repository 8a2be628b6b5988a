"""Distributions and tensor helpers shared by the additive-shift models (SAMS-VAE, CPA-VAE).

* :class:`StraightThroughBernoulli`: a Bernoulli mask drawn with the straight-through
  Gumbel (relaxed Bernoulli) estimator whose ``log_prob`` is the **Bernoulli log-mass of
  the hard value**. Pyro's :class:`~pyro.distributions.RelaxedBernoulliStraightThrough`
  scores the relaxed (unquantised) value with the Gumbel density instead, which is not
  a log q of the discrete mask and biases the ELBO (docs/models.md, "Mask log q").
* :func:`dosage_offset`: the latent offset ``d @ (E * M)`` for a ``(B, T)`` dosage and
  an effect matrix that may carry particle dimensions (vectorised ELBO particles,
  IWELBO particles, ``Predictive`` samples: ``(P, 1, T, L)``; docs/models.md, "Particle dimensions").
"""

from __future__ import annotations

import torch
from pyro.distributions import Bernoulli, RelaxedBernoulliStraightThrough

__all__ = ["StraightThroughBernoulli", "dosage_offset"]


class StraightThroughBernoulli(RelaxedBernoulliStraightThrough):
    """Straight-through Bernoulli: hard 0/1 samples, relaxed gradients, hard log-mass.

    ``rsample`` draws a relaxed Bernoulli (Gumbel-sigmoid) sample at ``temperature`` and
    rounds it; in the backward pass the gradient flows through the relaxed sample (the
    inherited behaviour). ``log_prob(value)`` is ``Bernoulli(logits).log_prob(value)``
    of the hard value, so ``log q(M)`` in the ELBO is the log-probability of the mask
    that was actually used.

    Args:
        temperature: relaxation temperature (a tensor; register it as a buffer).
        logits: Bernoulli logits.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return Bernoulli(logits=self.logits, validate_args=False).log_prob(value)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StraightThroughBernoulli, _instance)
        return super().expand(batch_shape, _instance=new)


def dosage_offset(d: torch.Tensor, effect: torch.Tensor) -> torch.Tensor:
    """Latent offset ``d @ effect`` of each cell.

    Args:
        d: ``(B, T)`` dosage.
        effect: ``(T, L)`` effect matrix (``E * M`` or ``E``), or with leading
            dimensions ``(*P, 1, T, L)``: a global latent sampled under a particle plate
            at dim -2 (one dimension to the left of the ``"cells"`` plate) comes out with
            a singleton in the cells-plate slot, which is dropped here. ``(P, T, L)``
            (how ``Predictive`` hands a guide's plate-free samples to the model) is used
            as it is.

    Returns:
        ``(B, L)``, or ``(*P, B, L)`` with particle dimensions, aligned with local sites
        of the ``"cells"`` plate (batch dim -1).
    """
    if effect.dim() >= 4:
        if effect.shape[-3] != 1:
            raise ValueError(
                f"effect of shape {tuple(effect.shape)}: expected (T, L), (P, T, L) or "
                "(..., P, 1, T, L) (particle dims left of the cells plate)"
            )
        effect = effect.squeeze(-3)
    # (P, T, L) (e.g. Predictive's samples of a guide without plates) is already aligned:
    # d @ effect -> (P, B, L), particles at dim -2, cells at dim -1
    return torch.matmul(d, effect)
