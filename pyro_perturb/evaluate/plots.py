"""PNG plots of the ATE evaluation (matplotlib, Agg backend): model vs data ATE per
treatment split, a posterior predictive check of a summary statistic, and the learned
mask (treatment x latent) of SAMS-VAE."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["ate_scatter", "ppc_plot", "mask_heatmap", "volcano_plot"]


def ate_scatter(res: dict, path, title: str = "") -> Path:
    """Model ATE (y) against data ATE (x), one panel per treatment split (and one against
    the simulator's true ATE for held-out treatments when known)."""
    data, model, splits = res["data"], res["model"], res["splits"]
    panels = [("all", list(data.index)),
              ("train", [lab for lab in data.index if splits.get(lab) == "train"]),
              ("test", [lab for lab in data.index if splits.get(lab) == "test"])]
    truth = res.get("true")
    n = len(panels) + (truth is not None)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for ax, (name, labs) in zip(axes[0], panels):
        labs = [lab for lab in labs if lab in model.index and np.isfinite(model.loc[lab].to_numpy()).all()]
        metrics = res["metrics"][name]
        if labs:
            xd, ym = data.loc[labs].to_numpy().ravel(), model.loc[labs].to_numpy().ravel()
            ax.scatter(xd, ym, s=3, alpha=0.4)
            lo, hi = float(min(xd.min(), ym.min())), float(max(xd.max(), ym.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_title(f"{name}: r={metrics['ate_pearson']:.2f}, R2={metrics['ate_r2']:.2f} ({len(labs)} trt)", fontsize=9)
        else:
            ax.set_title(f"{name}: no predictable treatment", fontsize=9)
        ax.set_xlabel("data ATE (held-out cells)")
        ax.set_ylabel("model ATE")
    if truth is not None:
        ax = axes[0][-1]
        labs = [lab for lab in truth.index if splits.get(lab) == "test" and np.isfinite(model.loc[lab].to_numpy()).all()]
        if labs:
            xt, ym = truth.loc[labs].to_numpy().ravel(), model.loc[labs].to_numpy().ravel()
            ax.scatter(xt, ym, s=3, alpha=0.4, color="C1")
            lo, hi = float(min(xt.min(), ym.min())), float(max(xt.max(), ym.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            m = res["metrics_true"]["test"]
            ax.set_title(f"test vs true ATE: r={m['ate_pearson']:.2f}", fontsize=9)
        ax.set_xlabel("simulator's true ATE")
        ax.set_ylabel("model ATE")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ppc_plot(idata, path, var: str = "zero_fraction") -> Path:
    """Observed statistic per (perturbation, gene) against its posterior predictive: left,
    the distribution over all entries (observed vs each draw); right, observed vs the
    predictive mean with 90% intervals."""
    pp = idata.posterior_predictive[var].values[0]  # (draw, label, gene)
    obs = idata.observed_data[var].values
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    bins = np.linspace(min(obs.min(), pp.min()), max(obs.max(), pp.max()), 40)
    for d in range(min(pp.shape[0], 20)):
        axes[0].hist(pp[d].ravel(), bins=bins, histtype="step", color="C0", alpha=0.3, density=True)
    axes[0].hist(obs.ravel(), bins=bins, histtype="step", color="k", lw=2, density=True, label="observed")
    axes[0].set_xlabel(var)
    axes[0].legend()
    lo, mid, hi = np.quantile(pp, [0.05, 0.5, 0.95], axis=0)
    axes[1].errorbar(obs.ravel(), mid.ravel(), yerr=[mid.ravel() - lo.ravel(), hi.ravel() - mid.ravel()],
                     fmt="o", ms=2, alpha=0.3, elinewidth=0.5)
    a, b = float(obs.min()), float(obs.max())
    axes[1].plot([a, b], [a, b], "k--", lw=0.8)
    axes[1].set_xlabel(f"observed {var}")
    axes[1].set_ylabel(f"posterior predictive {var} (median, 90%)")
    fig.suptitle(f"posterior predictive check: {var} per perturbation x gene")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mask_heatmap(probs: np.ndarray, perturbations: list[str], path, max_latents: int = 60) -> Path:
    """Heatmap of q(M_tl = 1) (treatments x latents); latents used by no treatment
    (all probabilities < 0.5) are dropped when that leaves any, and at most
    ``max_latents`` columns are shown (most used first)."""
    probs = np.asarray(probs)
    used = np.flatnonzero((probs > 0.5).any(0))
    cols = used if len(used) else np.arange(probs.shape[1])
    cols = cols[np.argsort(-probs[:, cols].sum(0), kind="stable")][:max_latents]
    fig, ax = plt.subplots(figsize=(max(4, 0.18 * len(cols) + 2), max(3, 0.2 * len(perturbations) + 1)))
    im = ax.imshow(probs[:, cols], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([str(c) for c in cols], fontsize=6, rotation=90)
    if len(perturbations) <= 80:
        ax.set_yticks(range(len(perturbations)))
        ax.set_yticklabels(perturbations, fontsize=6)
    ax.set_xlabel("latent")
    ax.set_ylabel("treatment")
    fig.colorbar(im, ax=ax, label="q(M = 1)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def volcano_plot(frame, path, title: str = "", label_top: int = 10) -> Path:
    """Volcano plot of a differential-expression frame
    (:func:`pyro_perturb.evaluate.de.differential_expression`): posterior mean LFC (x)
    against ``-log10(1 - prob_de)`` (y, capped where ``prob_de`` is 1), genes of the
    decision set coloured, ``+-delta`` dashed, the ``label_top`` DE genes of largest ``|LFC|`` named."""
    attrs = frame.attrs
    p = frame["prob_de"].to_numpy(dtype=float)
    floor = 1.0 / max(2 * int(attrs.get("n_samples", 1000)), 2)  # 1 - p below this is Monte Carlo resolution
    y = -np.log10(np.maximum(1.0 - p, floor))
    x = frame["lfc_mean"].to_numpy(dtype=float)
    de = frame["is_de"].to_numpy(dtype=bool)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(x[~de], y[~de], s=6, alpha=0.5, color="0.6", label=f"not DE ({int((~de).sum())})")
    ax.scatter(x[de], y[de], s=8, alpha=0.8, color="C3", label=f"DE ({int(de.sum())})")
    delta = attrs.get("delta")
    if delta is not None:
        for v in (-delta, delta):
            ax.axvline(v, color="k", ls="--", lw=0.7)
    # the decision set's largest effects (probabilities saturate at 1 for many genes)
    for i in np.lexsort((-np.abs(x), ~de))[: max(0, int(label_top))]:
        ax.annotate(str(frame.index[i]), (x[i], y[i]), fontsize=6, alpha=0.8)
    ax.set_xlabel(f"posterior mean LFC ({attrs.get('units', 'log2')})")
    ax.set_ylabel("-log10(1 - P(|LFC| > delta))")
    head = f"{attrs.get('perturbation', '')} vs {attrs.get('control', '')}: {attrs.get('method', '')}, " \
           f"expected FDR {attrs.get('expected_fdr', float('nan')):.3f} (target {attrs.get('fdr', float('nan')):g})"
    ax.set_title(title or head, fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
