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


# ---------------------------------------------------------------- training budget
# Every entry's defaults cap training in optimizer steps (TrainConfig.max_steps), so that
# the default budget does not grow with the data: about DEFAULT_CELLS_SEEN cells seen,
# max_steps = DEFAULT_CELLS_SEEN // batch_size (4,000 steps at batch 512, 16,000 at 128),
# with a validation every max_steps // 20 steps inside longer epochs (val_every_steps,
# ~100k cells: a data set whose single epoch outlasts the budget still keeps its best
# state and can stop early). Each family's max_epochs (100) stays as a second cap: it is
# the smaller budget up to ~20k training cells, the size of every data set the defaults
# were chosen and benchmarked on, which therefore train exactly as with epochs alone. On
# Papalexi 2021 (13,266 training cells) the runs at the defaults ended well inside the
# step budget: the SAMS-VAE family stopped early after <= 2,000 steps, SVAE+ after ~6,800
# (bench/results/sams_vae_results.md). An explicit max_epochs without max_steps drops the
# step budget (``fit``), so explicit epoch budgets train as they always did.
DEFAULT_CELLS_SEEN = 2_048_000
STEP_BUDGET_KEYS = ("max_steps", "val_every_steps")


def with_step_budget(train_defaults: dict) -> dict:
    """``train_defaults`` plus the step budget of its batch size (see above)."""
    from .infer.engine import TrainConfig

    max_steps = DEFAULT_CELLS_SEEN // train_defaults.get("batch_size", TrainConfig.batch_size)
    return {**train_defaults, "max_steps": max_steps, "val_every_steps": max(1, max_steps // 20)}


register(
    ModelEntry(
        name="cvae",
        description="Conditional VAE: z ~ N(0, I), decoder sees [z, dosage, covariates] (SAMS-VAE paper baseline)",
        model="pyro_perturb.models.cvae:ConditionalVAEModel",
        guide="pyro_perturb.guides.cvae:ConditionalVAEGuide",
        train_defaults=with_step_budget({}),
    )
)


register(
    ModelEntry(
        name="fcr",
        description="FCR: covariate / treatment / interaction latent blocks with classifiers and independence discriminator (Mao et al. 2024)",
        model="pyro_perturb.models.fcr:FCRModel",
        guide="pyro_perturb.guides.fcr:FCRGuide",
        # chosen by experiment (bench/fcr_benchmark.py): see FCR_TRAIN_DEFAULTS in models/fcr.py
        train_defaults=with_step_budget(_load("pyro_perturb.models.fcr:FCR_TRAIN_DEFAULTS")),
        default_data="factorized",
    )
)


# SAMS-VAE family (MODELS.md section 1). Training defaults: see SAMS_TRAIN_DEFAULTS in
# pyro_perturb/models/sams_vae.py (chosen by experiment, bench/sams_vae_benchmark.py),
# plus the step budget above.
from .models.sams_vae import SAMS_TRAIN_DEFAULTS  # noqa: E402

register(
    ModelEntry(
        name="sams_vae",
        description="SAMS-VAE, correlated guide: z = z_basal + d @ (E * M), sparse masks (Bereket & Karaletsos 2023)",
        model="pyro_perturb.models.sams_vae:SAMSVAEModel",
        guide="pyro_perturb.guides.sams_vae:SAMSVAECorrelatedGuide",
        train_defaults=with_step_budget(SAMS_TRAIN_DEFAULTS),
    )
)
register(
    ModelEntry(
        name="sams_vae_mf",
        description="SAMS-VAE, mean-field guide (Bereket & Karaletsos 2023)",
        model="pyro_perturb.models.sams_vae:SAMSVAEModel",
        guide="pyro_perturb.guides.sams_vae:SAMSVAEMeanFieldGuide",
        train_defaults=with_step_budget(SAMS_TRAIN_DEFAULTS),
    )
)
register(
    ModelEntry(
        name="cpa_vae",
        description="CPA-VAE: z = z_basal + d @ E, no mask (SAMS-VAE paper baseline)",
        model="pyro_perturb.models.sams_vae:CPAVAEModel",
        guide="pyro_perturb.guides.sams_vae:CPAVAEGuide",
        train_defaults=with_step_budget(SAMS_TRAIN_DEFAULTS),
    )
)


# ---------------------------------------------------------------- sVAE family (MODELS.md 2)
# Training defaults shared by the family, chosen by experiment on the sparse_shift
# simulator at the paper's sizes (bench/svae_benchmark.py, bench/results/svae_benchmark_notes.md):
# batch 128 and 2 x 128 hidden layers as in the paper; lr 3e-3 (at 1e-3 the sparse prior
# rotates the latents towards the true axes too slowly: MODELS.md section 5; lr 1e-2 was
# worse at epoch 10: MCC 0.48 vs 0.52), with the per-label shifts and mask logits at 10x
# (the models' own ``lr_multipliers``; MCC at epoch 40: 0.62 vs 0.52 without, x30 no
# better than x10); a 5-epoch KL warm-up (scaling the mask prior too); analytic KL for z
# ("meanfield"); up to 100 epochs (sVAE+ is still improving at 60) with early stopping
# on the validation ELBO (patience 20), and the step budget above. K_s = 20: see SVAEPlusModel.
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
            train_defaults=with_step_budget(SVAE_TRAIN_DEFAULTS),
            default_data="sparse_shift",
        )
    )
