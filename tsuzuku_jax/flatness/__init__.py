"""Hessian-vector products and Hessian estimators on parameter pytrees (Tsuzuku, Sato &
Sugiyama, ICML 2020: normalized flat minima).

The curvature tools (HVPs, Hutchinson, Lanczos, Gauss-Newton, dense references) are in
`hessian`, whose docstring says how to use them (and why to build operators inside a jit);
`normalized_op` (v -> theta * H(theta * v), the per-parameter terms invariant to the rescalings
that leave a ReLU network's function unchanged) and the measures are in `measures`.

Modules: `hessian` (the paper-free curvature tools: `hvp`, `hessian_op`, Hutchinson, Lanczos,
Gauss-Newton, dense references), `measures` (`normalized_op`, the measures and `measure_fn`),
`rescaling` (`rescale_neurons`), `pac_bayes` (PAC-Bayes bound arithmetic on the host),
`posterior` (fitting, sampling and certifying Gaussian posteriors) and `rank_correlation`
(Kendall's tau and the granulated tau over a model zoo). The names of `hessian`, `measures` and
`rescaling` are re-exported here; use `pac_bayes`, `posterior` and `rank_correlation` as modules
(`from tsuzuku_jax.flatness import pac_bayes, posterior, rank_correlation`).
"""

from tsuzuku_jax.flatness import (
  hessian,
  measures,
  pac_bayes,
  posterior,
  rank_correlation,
  rescaling,
)
from tsuzuku_jax.flatness.hessian import (
  Estimate,
  Lanczos,
  LossFn,
  Operator,
  PyTree,
  exact_diagonal,
  exact_hessian,
  gauss_newton_diagonal,
  hessian_op,
  hutchinson_diagonal,
  hutchinson_trace,
  hvp,
  lanczos,
  num_params,
  per_leaf_random,
  rademacher_probes,
  top_eigenvalues,
)
from tsuzuku_jax.flatness.measures import (
  FILTER_MEASURES,
  NORMALIZED_MEASURES,
  RAW_MEASURES,
  Measures,
  NormProducts,
  filter_normalized_op,
  filter_scales,
  inapplicable_measures,
  matrix_norm_products,
  measure_fn,
  normalized_diagonal,
  normalized_op,
  path_norm,
  sharpness_sigma,
  sigma_optimised,
)
from tsuzuku_jax.flatness.rescaling import rescale_neurons

__all__ = [
  'FILTER_MEASURES',
  'NORMALIZED_MEASURES',
  'RAW_MEASURES',
  'Estimate',
  'Lanczos',
  'LossFn',
  'Measures',
  'NormProducts',
  'Operator',
  'PyTree',
  'exact_diagonal',
  'exact_hessian',
  'filter_normalized_op',
  'filter_scales',
  'gauss_newton_diagonal',
  'hessian',
  'hessian_op',
  'hutchinson_diagonal',
  'hutchinson_trace',
  'hvp',
  'inapplicable_measures',
  'lanczos',
  'matrix_norm_products',
  'measure_fn',
  'measures',
  'normalized_diagonal',
  'normalized_op',
  'num_params',
  'pac_bayes',
  'path_norm',
  'per_leaf_random',
  'posterior',
  'rademacher_probes',
  'rank_correlation',
  'rescale_neurons',
  'rescaling',
  'sharpness_sigma',
  'sigma_optimised',
  'top_eigenvalues',
]
