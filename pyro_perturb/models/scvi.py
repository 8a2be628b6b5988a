"""scVI: a deep generative model of single-cell counts with batch covariates.

Generative story, for cell i with counts ``x_i`` (G genes), covariate codes ``c_i`` (the
data's ``--covariate-keys``; the first one, ``b_i``, is "the batch" of the library prior
and of gene-batch dispersion) and, optionally, dosage ``d_i``::

    z_i ~ Normal(0, I_L)                                           (local latent, "z")
    log l_i ~ Normal(mu_b, sigma_b^2)   (library="latent" only)    (local latent, "log_library")
    rho_i = softmax(f([z_i, onehot(c_i), (d_i)]))                  gene proportions
    x_ig ~ NB(l_i * rho_ig, theta_g)                               (observed, "x")

with ``l_i`` the observed total counts when ``library="observed"``; ``mu_b``, ``sigma_b``
the mean and standard deviation of ``log`` total counts over the training cells of batch
b (set by :meth:`SCVIModel.init_from_data`, called by :func:`pyro_perturb.fit`);
``theta_g`` per gene or per batch and gene (``dispersion="gene-batch"``). With
``likelihood="zinb"`` the decoder also gives zero-inflation logits ``logit(pi_ig)`` and
``x_ig ~ pi_ig delta_0 + (1 - pi_ig) NB(...)``; ``"poisson"``: ``x_ig ~ Poisson(l_i rho_ig)``.

scVI knows no perturbations: by default (``use_perturbation=False``) the decoder never
sees the dosage, the model's treatment effect is zero by construction and the ATE
evaluator skips it (:func:`pyro_perturb.contract.uses_dosage`). With
``use_perturbation=True`` the dosage is a decoder input, as in the conditional VAE.

Predictions without observations (``batch.x`` is None: counterfactuals, the ATE) are made
at the requested depth ``batch.library``, as scVI's normalised expression is; ``log l``
is still drawn from its prior there, so the model has the same sites.

The matching guide is :class:`pyro_perturb.guides.scvi.SCVIGuide`.

Reference: Lopez, Regier, Cole, Jordan & Yosef, "Deep generative modeling for
single-cell transcriptomics", Nature Methods 15, 1053-1058 (2018).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..data import Batch, DataSpec
from ..likelihoods import CountLikelihood, LibraryPrior
from ..nn import MLP, broadcast_cat, covariate_onehot

#: choices of scVI's hyperparameters (annotations of :class:`SCVIModel`)
SCVI_LIKELIHOODS = ("nb", "zinb", "poisson")
LIBRARY_MODES = ("observed", "latent")
DISPERSIONS = ("gene", "gene-batch")


def batch_codes(c: torch.Tensor) -> torch.Tensor:
    """``(B,)`` code of each cell's batch: its first covariate (0 without covariates)."""
    return c[:, 0] if c.shape[1] else c.new_zeros(c.shape[0])


def check_scvi_options(spec: DataSpec, likelihood: str, library: str, dispersion: str) -> None:
    """ValueError naming a hyperparameter value scVI cannot use with this data."""
    for name, value, choices in (("likelihood", likelihood, SCVI_LIKELIHOODS), ("library", library, LIBRARY_MODES),
                                 ("dispersion", dispersion, DISPERSIONS)):
        if value not in choices:
            raise ValueError(f"scVI's {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if dispersion == "gene-batch" and not spec.covariate_keys:
        raise ValueError("scVI's dispersion='gene-batch' needs a batch covariate (covariate_keys, --covariate-keys); "
                         "the data has none")
    if dispersion == "gene-batch" and likelihood == "poisson":
        raise ValueError("scVI's dispersion='gene-batch' is a negative binomial's: likelihood='poisson' has none")


class SCVIModel(PyroModule):
    """p(z) p(log l | b) p(x | z, l, c[, d]).

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent: L (10 as in scVI).
        n_hidden: width of the decoder's hidden layers (128).
        n_layers: number of hidden layers (1).
        likelihood: ``"nb"`` (default), ``"zinb"`` or ``"poisson"``.
        library: ``"observed"`` (default: ``l_i`` = total counts) or ``"latent"``
            (``log l_i`` with the per-batch empirical prior, as in the scVI paper).
        dispersion: ``"gene"`` (default) or ``"gene-batch"`` (one theta per batch and gene).
        use_perturbation: the decoder also sees the dosage (default False: plain scVI).
    """

    max_plate_nesting = 1
    #: z's prior ignores the dosage: a control cell's posterior z, decoded under another
    #: dosage, is its counterfactual (with use_perturbation)
    basal_sites = ("z",)

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        likelihood: Literal["nb", "zinb", "poisson"] = "nb",
        library: Literal["observed", "latent"] = "observed",
        dispersion: Literal["gene", "gene-batch"] = "gene",
        use_perturbation: bool = False,
    ) -> None:
        super().__init__()
        check_scvi_options(spec, likelihood, library, dispersion)
        self.spec = spec
        self.n_latent = n_latent
        self.latent_library = library == "latent"
        self.use_perturbation = bool(use_perturbation)
        self.uses_dosage = self.use_perturbation
        n_batches = spec.covariate_sizes[0] if spec.covariate_keys else 1
        n_inputs = n_latent + sum(spec.covariate_sizes) + (spec.n_perturbations if use_perturbation else 0)
        # zinb: one more head, the zero-inflation logits (one MLP, two blocks of outputs)
        n_outputs = spec.n_genes * (2 if likelihood == "zinb" else 1)
        self.decoder = MLP(n_inputs, [n_hidden] * n_layers, n_outputs)
        self.likelihood = CountLikelihood(spec.n_genes, likelihood, n_groups=n_batches if dispersion == "gene-batch" else 1)
        self.library_prior = LibraryPrior(n_batches) if self.latent_library else None

    def init_from_data(self, data) -> None:
        """Set the library prior from the training cells of ``data`` (a
        :class:`~pyro_perturb.data.PerturbationData`; all cells when none are training)."""
        if self.library_prior is None:
            return
        idx = data.indices("train")
        if len(idx) == 0:
            idx = np.arange(data.n_cells)
        codes = np.asarray(data.covariates[idx, 0]) if data.spec.covariate_keys else None
        self.library_prior.set_from_data(np.asarray(data.library[idx]), codes)

    def decode(self, z: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(gene_logits, zero_logits)`` ``(..., B, G)`` (zero_logits None unless zinb)."""
        parts = [z, covariate_onehot(batch.c, self.spec.covariate_sizes).to(z.dtype)]
        if self.use_perturbation:
            parts.append(batch.d)
        out = self.decoder(broadcast_cat(parts))
        if self.likelihood.kind == "zinb":
            gene_logits, zero_logits = out.chunk(2, dim=-1)
            return gene_logits, zero_logits
        return out, None

    def forward(self, batch: Batch, observe: bool = True):
        """Score (or, with ``observe=False``, sample) the batch's counts."""
        x = batch.x
        codes = batch_codes(batch.c)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            # from an input that is never None (x is None for posterior predictive)
            loc = batch.library.new_zeros((batch.size, self.n_latent))
            with poutine.scale(scale=batch.kl_weight):
                z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
                if self.latent_library:
                    prior_loc, prior_scale = self.library_prior(codes)
                    log_library = pyro.sample("log_library", dist.Normal(prior_loc, prior_scale))
            library = batch.library
            if self.latent_library and x is not None:
                library = log_library.exp()
            gene_logits, zero_logits = self.decode(z, batch)
            groups = codes if self.likelihood.n_groups > 1 else None
            return self.likelihood.observe("x", gene_logits, x if observe else None, library, zero_logits, groups)


__all__ = ["DISPERSIONS", "LIBRARY_MODES", "SCVIModel", "SCVI_LIKELIHOODS", "batch_codes", "check_scvi_options"]
