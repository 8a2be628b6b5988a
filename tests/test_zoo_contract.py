"""Every registered (model, guide) pair honours the zoo's contract (:mod:`pyro_perturb.contract`):
required parts and optional capabilities of their declared shapes, one default per shared
hyperparameter, checked hyperparameter values; it trains on its built-in kind of data, is
device clean, round-trips through a run directory, predicts latents and is evaluated by
held-out IWELBO (on ``PYRO_PERTURB_TEST_DEVICE``, default cpu: see
tests/devices.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyro_perturb as pp
from pyro_perturb import contract
from pyro_perturb.cli import main
from pyro_perturb.registry import ModelEntry, build, list_models, register

from .devices import TEST_DEVICE, assert_device_clean
from .small_sims import SMALL_SIMS

TINY_HP = {"n_latent": 4, "n_hidden": 16}
#: gene-graph models whose sparsity penalty enters the loss as an auxiliary loss
PENALISED_GRAPH_MODELS = ("dcdfg", "nodags")
NAMES = [entry.name for entry in list_models()]


@pytest.fixture(scope="module")
def datasets():
    out = {}
    for name, sizes in SMALL_SIMS.items():
        adata, options = pp.run.builtin_data(name, seed=0, **sizes)
        out[name] = (adata, options)
    return out


def _hparams(entry):
    known = entry.hyperparameters()
    hp = {k: v for k, v in TINY_HP.items() if k in known}
    if "n_latent" in hp and entry.default_data == "factorized":
        hp.pop("n_latent")
    return hp


@pytest.mark.parametrize("name", NAMES)
def test_contract(name, datasets, tmp_path):
    entry = pp.registry.get_entry(name)
    adata, options = datasets[entry.default_data]
    data = pp.PerturbationData.from_anndata(adata, **options)
    model, guide, _ = build(name, data.spec, _hparams(entry), gene_stats=data.gene_stats())
    assert getattr(model, "max_plate_nesting", None) is not None
    batch = data.batch(data.indices("train")[:12], n_cells=len(data.indices("train")))
    assert_device_clean(model, guide, batch)

    run = pp.fit(data, model=name, out=tmp_path / "run", max_epochs=2, batch_size=64, progress=False,
                 device=TEST_DEVICE.type, **_hparams(entry))
    assert all(np.isfinite(r["train_loss"]) for r in run.history)
    loaded = pp.load_run(tmp_path / "run", device=TEST_DEVICE.type)
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    latents = loaded.latents(data)
    assert latents["X_latent"].shape[0] == data.n_cells and np.isfinite(latents["X_latent"]).all()
    values = loaded.iwelbo(data, "test", num_particles=3)
    assert values.shape == (len(data.indices("test")),) and np.isfinite(values).all()


@pytest.mark.parametrize("name", NAMES)
def test_pair_meets_the_contract(name, datasets):
    """Required parts (PyroModules, forward(batch, observe), sites, plate, latents) and the
    optional capabilities' declared shapes, through the accessors."""
    entry = pp.registry.get_entry(name)
    adata, options = datasets[entry.default_data]
    data = pp.PerturbationData.from_anndata(adata, **options)
    model, guide, hparams = build(name, data.spec, _hparams(entry), gene_stats=data.gene_stats())
    batch = data.batch(data.indices("train")[:12], n_cells=len(data.indices("train")))
    contract.check_pair(model, guide, batch)
    # gene-graph models have no likelihood choice: they score log-normalised expression
    graph_model = contract.adjacency(model) is not None
    assert contract.likelihood_kind(model) == hparams.get("likelihood", "gaussian" if graph_model else None)
    assert contract.composes(model) is (entry.default_data != "sparse_shift")
    settings = contract.optimizer_settings(model, guide)
    assert (settings.adversary is not None) is (name == "fcr")
    assert (contract.auxiliary_loss(model) is not None) is (name in ("fcr", "co_cvae", *PENALISED_GRAPH_MODELS))
    assert (contract.training_loss(model) is not None) is (name == "mo_cvae")
    width = contract.treatment_network_width(guide)
    assert width == (max(hparams["n_hidden"], 2 * hparams["n_latent"]) if name == "sams_vae" else 0)
    scores = contract.target_scores(model, guide)
    if scores is not None:
        assert isinstance(scores, contract.TargetScores) and scores.scores.dtype == np.float64
        assert set(scores.labels) <= set(data.spec.labels) | set(data.spec.perturbations)
    masks = contract.mask_probabilities(guide)
    assert (masks is not None) is (name in ("sams_vae", "sams_vae_mf", "svae", "svae_plus"))


def test_svae_plus_masks_are_found():
    """The sVAE guide names its masks like SAMS-VAE's, so their heatmap is drawn."""
    adata, options = pp.run.builtin_data("sparse_shift", seed=0, **SMALL_SIMS["sparse_shift"])
    data = pp.PerturbationData.from_anndata(adata, **options)
    _, guide, _ = build("svae_plus", data.spec, {"n_latent": 4, "n_hidden": 16})
    masks = contract.mask_probabilities(guide)
    assert masks is not None and masks.labels == data.spec.labels[1:]
    assert masks.probabilities.shape == (data.spec.n_labels - 1, 4)
    np.testing.assert_allclose(masks.probabilities, 0.5)  # mask_init_logit 0


@pytest.mark.parametrize("name", NAMES)
def test_shared_hyperparameters_have_one_default(name):
    """A name in both signatures has the same default (the registry would use the model's
    for both) and every default passes its own check."""
    entry = pp.registry.get_entry(name)
    specs = entry.hyperparameter_specs()
    model_sig = pp.registry._signature_hyperparameters(entry.model_cls)
    guide_sig = pp.registry._signature_hyperparameters(entry.guide_cls)
    for key in set(model_sig) & set(guide_sig):
        assert model_sig[key].default == guide_sig[key].default, key
    for key, hp in specs.items():
        assert hp.kind in (int, float, str, bool), f"{key} lacks a checked annotation"
        assert hp.accepts(hp.default), key
    pp.registry.check_hyperparameters(name, entry.hyperparameters())


class _Model(torch.nn.Module):
    def __init__(self, spec, n_latent: int = 10) -> None:
        super().__init__()


class _Guide(torch.nn.Module):
    def __init__(self, spec, n_latent: int = 12) -> None:
        super().__init__()


def test_registering_two_defaults_for_one_hyperparameter_fails():
    entry = ModelEntry(name="_mismatch", description="", model=f"{__name__}:_Model", guide=f"{__name__}:_Guide")
    with pytest.raises(TypeError, match="'n_latent' is declared differently.*default 10.*default 12"):
        register(entry)
    assert "_mismatch" not in NAMES and "_mismatch" not in [e.name for e in list_models()]


@pytest.mark.parametrize(
    "name, key, value, message",
    [
        ("cvae", "n_latent", -3, "n_latent of model 'cvae' must be a positive integer, got -3"),
        ("cvae", "n_hidden", "abc", "n_hidden of model 'cvae' must be a positive integer, got 'abc'"),
        ("cvae", "n_layers", 2.0, "n_layers .* positive integer, got 2.0"),
        ("sams_vae", "mask_prior", 1.5, r"mask_prior .* in \(0, 1\), got 1.5"),
        ("sams_vae", "temperature", float("nan"), "temperature .* > 0, got nan"),
        ("svae_plus", "mask_gradient", "exact", "mask_gradient .* one of 'expected', 'straight_through', got 'exact'"),
        ("fcr", "shared_embedding", "yes", "shared_embedding .* true or false, got 'yes'"),
        ("fcr", "omega_pair", -0.1, "omega_pair .* >= 0, got -0.1"),
        ("vae", "likelihood", "zinb", "likelihood .* one of 'nb', 'poisson', 'gaussian', got 'zinb'"),
    ],
)
def test_build_refuses_bad_hyperparameters(name, key, value, message, datasets):
    entry = pp.registry.get_entry(name)
    adata, options = datasets[entry.default_data]
    spec = pp.PerturbationData.from_anndata(adata, **options).spec
    with pytest.raises(ValueError, match=message):
        build(name, spec, {key: value})


def test_build_accepts_an_int_for_a_float(datasets):
    adata, options = datasets["combinatorial"]
    spec = pp.PerturbationData.from_anndata(adata, **options).spec
    _, _, hparams = build("cpa_vae", spec, {"n_latent": 2, "n_hidden": 4, "embedding_prior_scale": 2})
    assert hparams["embedding_prior_scale"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n-latent", "-3"], "error: hyperparameter n_latent of model 'cvae' must be a positive integer, got -3"),
        (["--set", "n_hidden=abc"], "error: hyperparameter n_hidden of model 'cvae' must be a positive integer, got 'abc'"),
    ],
)
def test_cli_bad_hyperparameter_is_one_line_error(args, message, datasets, tmp_path, capsys):
    path = tmp_path / "tiny.h5ad"
    datasets["combinatorial"][0].write_h5ad(path)
    out = tmp_path / "run"
    code = main(["fit", "--model", "cvae", "--data", str(path), "--out", str(out), "--max-epochs", "1", "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == message
    assert not out.exists()


def test_check_pair_reports_violations(datasets):
    """A model with another pair's guide: the latent sites differ."""
    adata, options = datasets["combinatorial"]
    data = pp.PerturbationData.from_anndata(adata, **options)
    model, _, _ = build("cvae", data.spec, {"n_latent": 3, "n_hidden": 8})
    _, other_guide, _ = build("cpa_vae", data.spec, {"n_latent": 3, "n_hidden": 8})
    batch = data.batch(data.indices("train")[:8], n_cells=len(data.indices("train")))
    with pytest.raises(TypeError, match=r"latent sites differ: model \['z'\], guide \['E', 'z_basal'\]"):
        contract.check_pair(model, other_guide, batch)
