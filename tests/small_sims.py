"""Sizes of each built-in simulator small enough for every-model tests (seconds per model)."""

SMALL_SIMS = {
    "combinatorial": dict(n_singles=4, n_doubles=2, cells_per_perturbation=25, n_control_cells=50, n_genes=30, n_ate_draws=20),
    "sparse_shift": dict(n_latent=4, n_perturbations=6, cells_per_perturbation=25, n_control_cells=25, n_genes=30, n_heldout=2),
    "factorized": dict(n_covariates=2, n_treatments=3, cells_per_group=20, n_genes=30, n_heldout_pairs=1),
    "comparative": dict(n_perturbations=2, n_control_cells=40, cells_per_perturbation=25, n_genes=30),
    "causal_dag": dict(n_genes=12, cells_per_intervention=15, n_control_cells=40),
    "cyclic_graph": dict(n_genes=8, cells_per_perturbation=12, n_control_cells=24),
}
