"""The zoo's table of registered (model, guide) pairs.

Each entry names a model class in ``pyro_perturb/models/`` and its guide in the
same-named module of ``pyro_perturb/guides/``. Model hyperparameters and their defaults
are read from the two classes' ``__init__`` signatures (one source of truth); an entry
may override training settings (:class:`pyro_perturb.infer.TrainConfig`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import DataSpec


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    model: str  # "module:Class"
    guide: str
    train_defaults: dict = field(default_factory=dict)
    model_defaults: dict = field(default_factory=dict)  # overrides of signature defaults
    default_data: str = "combinatorial"  # built-in simulator used when no data is given
    needs_perturbations: bool = True  # False: also trains on control-only data (the model ignores labels)

    @property
    def model_cls(self) -> type:
        return _load(self.model)

    @property
    def guide_cls(self) -> type:
        return _load(self.guide)

    def hyperparameters(self) -> dict:
        """Model hyperparameters with their defaults (model and guide signatures)."""
        params = {}
        for cls in (self.guide_cls, self.model_cls):
            for p in list(inspect.signature(cls.__init__).parameters.values())[2:]:
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    continue
                params[p.name] = p.default
        params.update(self.model_defaults)
        return params


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    _REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_models() -> list[ModelEntry]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _accepted(cls: type, hparams: dict) -> dict:
    names = set(list(inspect.signature(cls.__init__).parameters)[2:])
    return {k: v for k, v in hparams.items() if k in names}


def build(
    name: str,
    spec: DataSpec,
    hparams: dict | None = None,
    gene_stats: tuple[np.ndarray, np.ndarray] | None = None,
):
    """Instantiate ``(model, guide)`` of a registered entry.

    ``hparams`` overrides the defaults; unknown keys raise a ``ValueError`` naming them.
    ``gene_stats`` (mean, std of log1p counts on training cells) fills every
    :class:`~pyro_perturb.nn.ExpressionNormalizer` of the pair.
    """
    entry = get_entry(name)
    full = entry.hyperparameters()
    unknown = sorted(set(hparams or {}) - set(full))
    if unknown:
        raise ValueError(
            f"model {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"its hyperparameters: {', '.join(sorted(full))}"
        )
    full.update(hparams or {})
    model = entry.model_cls(spec, **_accepted(entry.model_cls, full))
    guide = entry.guide_cls(spec, **_accepted(entry.guide_cls, full))
    if gene_stats is not None:
        from .nn import ExpressionNormalizer

        for module in list(model.modules()) + list(guide.modules()):
            if isinstance(module, ExpressionNormalizer):
                module.gene_mean.copy_(torch.as_tensor(gene_stats[0]))
                module.gene_std.copy_(torch.as_tensor(gene_stats[1]))
    return model, guide, full


register(
    ModelEntry(
        name="cvae",
        description="Conditional VAE: z ~ N(0, I), decoder sees [z, dosage, covariates] (SAMS-VAE paper baseline)",
        model="pyro_perturb.models.cvae:ConditionalVAEModel",
        guide="pyro_perturb.guides.cvae:ConditionalVAEGuide",
    )
)


register(
    ModelEntry(
        name="fcr",
        description="FCR: covariate / treatment / interaction latent blocks with classifiers and independence discriminator (Mao et al. 2024)",
        model="pyro_perturb.models.fcr:FCRModel",
        guide="pyro_perturb.guides.fcr:FCRGuide",
        # chosen by experiment (bench/fcr_benchmark.py): see FCR_TRAIN_DEFAULTS in models/fcr.py
        train_defaults=dict(_load("pyro_perturb.models.fcr:FCR_TRAIN_DEFAULTS")),
        default_data="factorized",
    )
)


# SAMS-VAE family (docs/models.md, "SAMS-VAE"). Training defaults: see SAMS_TRAIN_DEFAULTS in
# pyro_perturb/models/sams_vae.py (chosen by experiment, bench/sams_vae_benchmark.py).
from .models.sams_vae import SAMS_TRAIN_DEFAULTS  # noqa: E402

register(
    ModelEntry(
        name="sams_vae",
        description="SAMS-VAE, correlated guide: z = z_basal + d @ (E * M), sparse masks (Bereket & Karaletsos 2023)",
        model="pyro_perturb.models.sams_vae:SAMSVAEModel",
        guide="pyro_perturb.guides.sams_vae:SAMSVAECorrelatedGuide",
        train_defaults=dict(SAMS_TRAIN_DEFAULTS),
    )
)
register(
    ModelEntry(
        name="sams_vae_mf",
        description="SAMS-VAE, mean-field guide (Bereket & Karaletsos 2023)",
        model="pyro_perturb.models.sams_vae:SAMSVAEModel",
        guide="pyro_perturb.guides.sams_vae:SAMSVAEMeanFieldGuide",
        train_defaults=dict(SAMS_TRAIN_DEFAULTS),
    )
)
register(
    ModelEntry(
        name="cpa_vae",
        description="CPA-VAE: z = z_basal + d @ E, no mask (SAMS-VAE paper baseline)",
        model="pyro_perturb.models.sams_vae:CPAVAEModel",
        guide="pyro_perturb.guides.sams_vae:CPAVAEGuide",
        train_defaults=dict(SAMS_TRAIN_DEFAULTS),
    )
)


# ---------------------------------------------------------------- sVAE family (docs/models.md)
# Training defaults shared by the family: batch 128 as in the paper, lr 3e-3 with the
# per-label shifts and mask logits at 10x (the models' own ``lr_multipliers``), a 5-epoch KL
# warm-up, analytic KL for z, early stopping on the validation ELBO.
# Chosen by experiment: bench/results/defaults_rationale.md#svae-family
SVAE_TRAIN_DEFAULTS = dict(
    lr=3e-3,
    batch_size=128,
    max_epochs=100,
    kl_warmup_epochs=5,
    elbo="meanfield",
    early_stopping_patience=20,
)
for _name, _desc, _model, _guide in [
    ("svae_plus", "sVAE+: sparse mechanism shift, Beta(1, K_s) prior on straight-through latent masks",
     "SVAEPlusModel", "MaskedShiftGuide"),
    ("svae", "sVAE: sparse mechanism shift with an L0-like penalty on the masks", "SVAEModel", "MaskedShiftGuide"),
    ("ivae", "iVAE: z ~ N(mu_label, I), dense learned shift per label", "IVAEModel", "SparseShiftGuide"),
    ("vae", "VAE: z ~ N(0, I), decoder and encoder never see the label", "VAEModel", "SparseShiftGuide"),
    ("beta_vae", "beta-VAE: VAE with the KL weighted by beta", "BetaVAEModel", "BetaVAEGuide"),
]:
    register(
        ModelEntry(
            name=_name,
            description=_desc,
            model=f"pyro_perturb.models.svae:{_model}",
            guide=f"pyro_perturb.guides.svae:{_guide}",
            train_defaults=dict(SVAE_TRAIN_DEFAULTS),
            default_data="sparse_shift",
            needs_perturbations=_name not in ("vae", "beta_vae"),  # these two never see the label
        )
    )
