"""FCR: factorised causal representation of responses across cell contexts (docs/models.md, "FCR").

Generative story for cell i with covariates ``c_i`` (one or more categorical columns),
dosage ``d_i`` (T treatments; 0 for controls, multi-hot for combinations, doses allowed)
and observed library size ``l_i``::

    e_x(c)  = sum_k Emb^x_k(c_k)            e_tx(c) = sum_k Emb^tx_k(c_k)
    z_x  ~ Normal(MLP_x(e_x(c)))                           covariate block      ("z_x")
    z_t  ~ Normal(MLP_t(d))                                treatment block      ("z_t")
    z_tx ~ Normal(MLP_tx(e_tx(c) * m(d)))                  interaction block    ("z_tx")
    m(d) = MLP_mix(d) - MLP_mix(0)
    x    ~ NB(l * softmax(f([z_x, z_tx, z_t])), theta)     (or Gaussian on log1p(1e4 x / l))

Each prior MLP returns a location and a (softplus) scale. ``MLP_tx`` is a real MLP after
the element-wise product (a bare product predicted held-out pairs worse:
bench/results/defaults_rationale.md#fcr). Optionally (``n_interaction_heads = K > 1``)
the z_tx prior is the normalised product of K independently initialised such priors
(:func:`product_of_experts`), each fitted to z_tx on its own: an ensemble over the
interaction's extrapolation to unseen pairs, which the training pairs do not determine
(bench/results/fcr_diagnosis.md).
``m(0) = 0``: controls have no interaction, so the interaction embedding of a covariate
only learns from its treated cells. ``e_tx(c) = mean + offset(c)`` with offsets
starting near 0 (``interaction_init``): a covariate never seen under any treatment keeps
the shared mean, i.e. it is predicted with the *average* interaction of the others (its
response then comes from z_t, the average z_tx, and its own context z_x). Without the
shared mean such a covariate would get "no interaction" (z_tx of controls), a point the
decoder never saw together with a treated z_t (measured: bench/results/defaults_rationale.md#fcr).
All networks here are point-estimated globals (``nn.Parameter``), like the other
models of the zoo; the guide is :class:`pyro_perturb.guides.fcr.FCRGuide`.

Regularisers on top of the ELBO (the paper's, not the public release's; docs/models.md, "FCR"),
through the training engine's hooks:

* :meth:`FCRModel.auxiliary_loss` (minimised with the ELBO, gradient into the encoders):
  - ``omega_classifier`` x cross-entropy of a covariate classifier on ``z_x`` (one head per
    covariate column) plus a treatment classifier on ``(z_t, z_tx)`` (the cell's full
    perturbation label, combinations included);
  - ``omega_independence`` x the FactorVAE total-correlation estimate ``D(z)``: the logit
    of the permutation discriminator on the joint ``[z_x, z_t, z_tx]``, which the encoders
    minimise (they are trained to fool the discriminator);
  - ``omega_pair`` x the control-pairing term: each treated cell is paired with a random
    control cell of the same covariates in the minibatch, and the squared distance between
    their ``z_x`` posterior means is penalised (the covariate block must not carry the
    treatment).
  Latents for these terms are reparameterised draws from the guide; every term is a mean
  over the batch multiplied by the population size ``batch.n_cells``, so ``omega = 1``
  weighs one nat of a regulariser per cell like one nat of the ELBO per cell.
* ``adversary`` + :meth:`FCRModel.adversary_loss`: the permutation discriminator, trained
  by the engine's separate Adam to tell joint draws from block-wise shuffled ones (binary
  cross-entropy). By default the blocks are shuffled *within* (covariate, treatment)
  groups of the batch (``independence="conditional"``): the prior factorises given
  (c, d), not marginally (z_tx depends on c and d by design). ``"marginal"`` shuffles over
  the whole batch (FactorVAE's original).

``omega_2`` of the paper (the KL weight) is the engine's ``kl_warmup_epochs`` annealing
times ``omega_kl`` (default 1: the plain ELBO; other values make the held-out IWELBO a
tempered quantity).

Counterfactual prediction uses the zoo's generic interface (see
:mod:`pyro_perturb.evaluate.groups`): with ``batch.x = None`` the guide samples nothing
and all three blocks come from their conditional priors for the requested (c, d).

Reference: Mao, Lopez, Liu, Huetter, Richmond, Benos, Qiu, "Learning Identifiable
Factorized Causal Representations of Cellular Responses", NeurIPS 2024.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from .. import contract
from ..data import Batch, DataSpec
from ..likelihoods import CountLikelihood
from ..nn import MLP, GaussianEncoder, broadcast_cat

INDEPENDENCE = ("conditional", "marginal")

# Training defaults of the registered "fcr" entry (batch 256, lr 1e-3, up to 100 epochs with
# early stopping, no KL warm-up, one particle) and the model defaults of the signature
# (blocks of 8 latents, covariate embedding 8, separate e_x and e_tx, one interaction head).
# Chosen by experiment: bench/results/defaults_rationale.md#fcr
FCR_TRAIN_DEFAULTS = {"max_epochs": 100, "batch_size": 256, "lr": 1e-3, "kl_warmup_epochs": 0}


class CovariateEmbedding(nn.Module):
    """Sum of one learned embedding per categorical covariate column: ``(B, K) -> (B, E)``.

    ``init_scale`` is the standard deviation of the initial entries.

    With ``shared_mean``, a learned vector common to all categories is added: categories
    then differ from it by their own offsets, and a category never trained keeps (near)
    the shared mean, the "average category".
    """

    def __init__(self, sizes, dim: int, init_scale: float = 1.0, shared_mean: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.tables = nn.ModuleList([nn.Embedding(int(n), dim) for n in sizes])
        for table in self.tables:
            nn.init.normal_(table.weight, std=init_scale)
        self.mean = nn.Parameter(torch.randn(dim)) if shared_mean else None

    def forward(self, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = like.new_zeros((c.shape[0], self.dim))
        if self.mean is not None:
            out = out + self.mean
        for k, table in enumerate(self.tables):
            out = out + table(c[:, k])
        return out


class InteractionHead(nn.Module):
    """One interaction prior ``(c, d) -> (loc, scale)`` of z_tx: ``MLP_tx(e_tx(c) * m(d))``.

    ``e_tx(c) = embed(c)`` (:class:`CovariateEmbedding` with a shared mean), or the caller's
    covariate embedding ``e_x`` when ``embed`` is None; ``m(d) = mix(d) - mix(0)``, exactly 0
    on control rows; ``prior`` maps ``e_tx * m`` to (loc, scale).
    """

    def __init__(self, embed: "CovariateEmbedding | None", mix: nn.Module, prior: GaussianEncoder) -> None:
        super().__init__()
        self.embed = embed
        self.mix = mix
        self.prior = prior

    def forward(self, c: torch.Tensor, d: torch.Tensor, e_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e_tx = e_x if self.embed is None else self.embed(c, d)
        # mix(d) - mix(0): controls carry no interaction (as g(c, control) = 0), exactly 0
        # on control rows, not merely to rounding
        treated = (d.abs().sum(-1, keepdim=True) > 0).to(d.dtype)
        mix = (self.mix(d) - self.mix(d.new_zeros((1, d.shape[-1])))) * treated
        return self.prior(e_tx * mix)


def product_of_experts(locs: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised geometric mean of K diagonal Normals ``prod_k N(mu_k, s_k)^(1/K) / Z``.

    Args:
        locs, scales: ``(K, B, L)``.

    Returns:
        ``loc (B, L)``, ``scale (B, L)`` (precision = mean of the K precisions, loc = their
        precision-weighted mean) and ``log Z (B,)`` (<= 0, summed over L): ``mean_k log
        N_k(z) = log N(z; loc, scale) + log Z`` for every z, so adding ``log Z`` to the
        model's log density makes each of the K experts fit z independently (an ensemble)
        while the site itself is a plain Normal.
    """
    precision = scales.pow(-2)
    scale = precision.mean(0).rsqrt()
    loc = (precision * locs).mean(0) * scale.pow(2)
    # log Z = mean_k log N(loc; mu_k, s_k) - log N(loc; loc, scale)
    mean_log = dist.Normal(locs, scales).log_prob(loc.unsqueeze(0)).mean(0)
    log_z = (mean_log - dist.Normal(loc, scale).log_prob(loc)).sum(-1)
    return loc, scale, log_z


def within_group_permutation(groups: torch.Tensor) -> torch.Tensor:
    """A random permutation ``(B,)`` that only exchanges cells of the same group code."""
    noise = torch.rand(groups.shape, device=groups.device)
    by_group = torch.argsort(groups.to(noise.dtype) * 2.0, stable=True)  # group order
    shuffled = torch.argsort(groups.to(noise.dtype) * 2.0 + noise)  # same blocks, random within
    perm = torch.empty_like(by_group)
    perm[by_group] = shuffled
    return perm


def group_codes(label: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One integer code per distinct (label, covariate values) row of a batch."""
    code = label.clone() + 1  # labels start at -1 (unseen combination)
    for k in range(c.shape[1]):
        code = code * (int(c[:, k].max()) + 1) + c[:, k]
    return code


class FCRModel(PyroModule):
    """p(z_x | c) p(z_t | d) p(z_tx | c, d) p(x | z_x, z_tx, z_t).

    Args:
        spec: the data's :class:`DataSpec`.
        n_latent_x, n_latent_t, n_latent_tx: sizes of the three blocks.
        n_hidden: width of the hidden layers (priors, decoder).
        n_layers: hidden layers of the decoder.
        covariate_embedding: size of the covariate embeddings ``e_x``, ``e_tx`` and of
            ``MLP_mix(d)``.
        likelihood: ``"nb"`` (counts, default), ``"poisson"`` or ``"gaussian"`` (on
            log-normalised data, as in the original paper).
        omega_classifier: weight of the covariate and treatment classifiers.
        omega_independence: weight of the encoders' adversarial independence term.
        omega_pair: weight of the control-pairing term.
        omega_kl: extra weight of the latent sites (the paper's omega_2); 1 = ELBO.
        independence: ``"conditional"`` (shuffle within (c, t) groups) or ``"marginal"``.
        adversary_lr: learning rate of the discriminator's own Adam.
        interaction_init: initial scale of the interaction embeddings ``e_tx``.
        shared_embedding: use ``e_x`` as ``e_tx`` (one covariate embedding for both priors,
            as in the paper's equations, docs/models.md "FCR"): the interaction of a
            covariate never seen treated is then extrapolated from its basal embedding
            instead of being "none".
        n_interaction_heads: number K of interaction priors combined as a product of
            experts (1: the plain FCR prior; bench/results/defaults_rationale.md#fcr).
    """

    max_plate_nesting = 1

    def __init__(
        self,
        spec: DataSpec,
        n_latent_x: int = 8,
        n_latent_t: int = 8,
        n_latent_tx: int = 8,
        n_hidden: int = 256,
        n_layers: int = 1,
        covariate_embedding: int = 8,
        likelihood: str = "nb",
        omega_classifier: float = 1.0,
        omega_independence: float = 1.0,
        omega_pair: float = 0.1,
        omega_kl: float = 1.0,
        independence: str = "conditional",
        adversary_lr: float = 1e-3,
        interaction_init: float = 0.01,
        shared_embedding: bool = False,
        n_interaction_heads: int = 1,
    ) -> None:
        super().__init__()
        if independence not in INDEPENDENCE:
            raise ValueError(f"independence must be one of {INDEPENDENCE}, got {independence!r}")
        for name, value in [("omega_classifier", omega_classifier), ("omega_independence", omega_independence),
                            ("omega_pair", omega_pair)]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if omega_kl <= 0:
            raise ValueError(f"omega_kl must be > 0, got {omega_kl}")
        if isinstance(n_interaction_heads, bool) or not isinstance(n_interaction_heads, int) or n_interaction_heads < 1:
            raise ValueError(f"n_interaction_heads must be an integer >= 1, got {n_interaction_heads!r}")
        self.spec = spec
        self.sizes = (n_latent_x, n_latent_t, n_latent_tx)
        self.omega_classifier = float(omega_classifier)
        self.omega_independence = float(omega_independence)
        self.omega_pair = float(omega_pair)
        self.omega_kl = float(omega_kl)
        self.independence = independence
        self.adversary_lr = float(adversary_lr)
        T = spec.n_perturbations
        E = covariate_embedding
        hidden = [n_hidden]
        # conditional priors
        self.cov_embed_x = CovariateEmbedding(spec.covariate_sizes, E)
        # e_tx(c) = shared mean + offset(c), offsets starting near 0: a covariate never seen
        # treated gets no gradient through the product (m(d) is 0 on controls) and keeps
        # the shared mean, i.e. the average interaction of the covariates that were
        self.shared_embedding = bool(shared_embedding)
        K = self.n_interaction_heads = int(n_interaction_heads)
        embeds = [
            None if shared_embedding else CovariateEmbedding(spec.covariate_sizes, E, init_scale=interaction_init, shared_mean=True)
            for _ in range(K)
        ]
        self.prior_x = GaussianEncoder(E, hidden, n_latent_x)
        self.prior_t = GaussianEncoder(T, hidden, n_latent_t)
        # K independently initialised interaction priors, combined as a product of experts
        # (see _priors): the interaction of an unseen (c, t) pair is not identified by the
        # training pairs, so one head's extrapolation is one arbitrary guess (default 1:
        # bench/results/defaults_rationale.md#fcr). Modules are created in the order
        # embeddings, prior_x, prior_t, mix, prior_tx, so that K = 1 draws the initial
        # weights of the plain single-head FCR prior.
        heads = []
        for embed in embeds:
            mix = MLP(T, hidden, E)
            heads.append(InteractionHead(embed, mix, GaussianEncoder(E, hidden, n_latent_tx)))
        self.interaction_heads = nn.ModuleList(heads)
        # decoder of [z_x, z_tx, z_t]
        self.decoder = MLP(sum(self.sizes), [n_hidden] * n_layers, spec.n_genes)
        self.likelihood = CountLikelihood(spec.n_genes, likelihood)
        # regularisers: classifiers (trained with the ELBO) and the discriminator (own Adam)
        self.cov_classifiers = nn.ModuleList([MLP(n_latent_x, hidden, int(n)) for n in spec.covariate_sizes])
        self.trt_classifier = MLP(n_latent_t + n_latent_tx, hidden, max(spec.n_labels, 1))
        self.adversary = MLP(sum(self.sizes), [n_hidden, n_hidden], 1, activation="leaky_relu")

    # ------------------------------------------------------------------ priors
    def prior_params(self, batch: Batch):
        """``{"z_x": (loc, scale), "z_t": ..., "z_tx": ...}`` of the conditional priors."""
        return self._priors(batch)[0]

    def _priors(self, batch: Batch):
        """:meth:`prior_params` and the heads' ``log Z`` ``(B,)`` of :func:`product_of_experts`
        (``None`` with one head)."""
        d = batch.d
        e_x = self.cov_embed_x(batch.c, d)
        heads = [head(batch.c, d, e_x) for head in self.interaction_heads]
        if len(heads) == 1:
            z_tx, log_z = heads[0], None
        else:
            loc, scale, log_z = product_of_experts(torch.stack([h[0] for h in heads]), torch.stack([h[1] for h in heads]))
            z_tx = (loc, scale)
        return {"z_x": self.prior_x(e_x), "z_t": self.prior_t(d), "z_tx": z_tx}, log_z

    def decode(self, z_x: torch.Tensor, z_t: torch.Tensor, z_tx: torch.Tensor) -> torch.Tensor:
        """Gene logits (or Gaussian means) of the blocks, concatenated as [z_x, z_tx, z_t]."""
        return self.decoder(broadcast_cat([z_x, z_tx, z_t]))

    def forward(self, batch: Batch, observe: bool = True):
        """Score (or, with ``observe=False``, sample) the batch's counts."""
        priors, log_z = self._priors(batch)
        z = {}
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=batch.kl_weight * self.omega_kl):
                for name in ("z_x", "z_t", "z_tx"):
                    loc, scale = priors[name]
                    z[name] = pyro.sample(name, dist.Normal(loc, scale).to_event(1))
                if log_z is not None:
                    # mean_k log N_k(z_tx) = log N(z_tx; PoE) + log Z: each head fits z_tx
                    # on its own (log Z <= 0, so this stays a lower bound on log p(x))
                    pyro.factor("z_tx_heads", log_z)
            gene_logits = self.decode(z["z_x"], z["z_t"], z["z_tx"])
            x = batch.x if observe else None
            return self.likelihood.observe("x", gene_logits, x, batch.library)

    # ------------------------------------------------------------------ regularisers
    def _draws(self, guide, batch: Batch, detach: bool = False):
        # the guide's posterior from this step's ELBO pass on the same batch when available
        # (for the discriminator: the encoders' output before this step's update, as in
        # FactorVAE, which trains D on the same draws)
        post = contract.cached_posterior(guide, batch, differentiable=not detach)
        draws = {}
        for name, (loc, scale) in post.items():
            draws[name] = loc + scale * torch.randn_like(loc)
            if detach:
                draws[name] = draws[name].detach()
        return post, draws

    def _shuffled(self, draws: dict, batch: Batch) -> torch.Tensor:
        groups = group_codes(batch.label, batch.c) if self.independence == "conditional" else torch.zeros_like(batch.label)
        parts = []
        for name in ("z_x", "z_t", "z_tx"):
            parts.append(draws[name][within_group_permutation(groups)])
        return torch.cat(parts, dim=-1)

    def regulariser_terms(self, guide, batch: Batch) -> dict[str, torch.Tensor]:
        """Each regulariser as a per-cell mean (unweighted), differentiable.

        ``classifier``: covariate CE on z_x + treatment CE on (z_t, z_tx);
        ``independence``: mean discriminator logit on joint draws (the encoders' loss);
        ``pair``: squared distance of z_x means between treated cells and their paired
        same-covariate controls (0 when the batch has no such pair).
        """
        post, draws = self._draws(guide, batch)
        zero = batch.d.new_zeros(())
        # classifiers
        ce = zero
        for k, head in enumerate(self.cov_classifiers):
            ce = ce + F.cross_entropy(head(draws["z_x"]), batch.c[:, k])
        known = batch.label >= 0
        if self.spec.n_labels > 1 and bool(known.any()):
            logits = self.trt_classifier(torch.cat([draws["z_t"], draws["z_tx"]], dim=-1))
            ce = ce + F.cross_entropy(logits[known], batch.label[known])
        # independence: the encoders minimise the discriminator's log density ratio
        joint = torch.cat([draws["z_x"], draws["z_t"], draws["z_tx"]], dim=-1)
        independence = self.adversary(joint).squeeze(-1).mean()
        # control pairing
        pair = zero
        partner = self.control_partners(batch)
        has = partner >= 0
        if self.omega_pair > 0 and bool(has.any()):
            mu_x = post["z_x"][0]
            pair = ((mu_x[has] - mu_x[partner[has]]) ** 2).sum(-1).mean()
        return {"classifier": ce, "independence": independence, "pair": pair}

    def control_partners(self, batch: Batch) -> torch.Tensor:
        """For each treated cell, a random control cell of the same covariates in the batch
        (its row index), else -1 (controls and cells without a same-covariate control)."""
        control = batch.d.abs().sum(-1) == 0
        B = batch.size
        cov = group_codes(torch.zeros_like(batch.label), batch.c)
        same = cov.unsqueeze(0) == cov.unsqueeze(1)  # (B, B)
        ok = same & control.unsqueeze(0) & ~control.unsqueeze(1)
        # random choice among the allowed partners: argmax of noise masked to allowed
        noise = torch.rand((B, B), device=batch.d.device)
        score = torch.where(ok, noise, noise.new_full((), -1.0))
        best = score.argmax(-1)
        return torch.where(ok.any(-1), best, torch.full_like(best, -1))

    def auxiliary_loss(self, guide, batch: Batch) -> torch.Tensor:
        """Weighted regularisers on the ELBO's scale (population total)."""
        terms = self.regulariser_terms(guide, batch)
        total = (
            self.omega_classifier * terms["classifier"]
            + self.omega_independence * terms["independence"]
            + self.omega_pair * terms["pair"]
        )
        return batch.n_cells * total

    def adversary_loss(self, guide, batch: Batch) -> torch.Tensor:
        """Discriminator loss: joint draws labelled 1, within-group shuffled draws 0."""
        with torch.no_grad():
            _, draws = self._draws(guide, batch, detach=True)
            joint = torch.cat([draws["z_x"], draws["z_t"], draws["z_tx"]], dim=-1)
            shuffled = self._shuffled(draws, batch)
        logit_joint = self.adversary(joint).squeeze(-1)
        logit_shuffled = self.adversary(shuffled).squeeze(-1)
        return F.binary_cross_entropy_with_logits(
            logit_joint, torch.ones_like(logit_joint)
        ) + F.binary_cross_entropy_with_logits(logit_shuffled, torch.zeros_like(logit_shuffled))
