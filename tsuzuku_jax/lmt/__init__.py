"""Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018) and certification, on any
model `apply_fn(variables, images) -> logits`.

`certificate` reads the model's jaxpr (`analysis`) and gives sound bounds (a `Certificate`,
reused across batches); `certify` and `certify_dataset` turn it into certified radii (`radii`);
`estimate` is LMT's differentiable training estimate on the same linear segments (an
`Estimate`, refused where a certificate is required), and `make_loss` the training loss built
from it (`margins`). `bounds` holds the per-operator certificates and power iteration.
"""

from tsuzuku_jax.lmt import analysis, bounds, margins, radii
from tsuzuku_jax.lmt.analysis import (
  Certificate,
  Estimate,
  UnsupportedOperation,
  certificate,
  estimate,
  init_iterates,
)
from tsuzuku_jax.lmt.margins import (
  FORMS,
  VARIANTS,
  c_schedule,
  gloro_logits,
  lmt_loss,
  make_loss,
  margin_logits,
  pairwise_bounds,
  training_loss,
)
from tsuzuku_jax.lmt.radii import (
  CONVERGED_ITERS,
  FormRadii,
  Radii,
  Report,
  Soundness,
  certified_accuracy,
  certified_radius,
  certify,
  certify_dataset,
  robustness_report,
  segment_report,
)

__all__ = [
  'CONVERGED_ITERS',
  'FORMS',
  'VARIANTS',
  'Certificate',
  'Estimate',
  'FormRadii',
  'Radii',
  'Report',
  'Soundness',
  'UnsupportedOperation',
  'analysis',
  'bounds',
  'c_schedule',
  'certificate',
  'certified_accuracy',
  'certified_radius',
  'certify',
  'certify_dataset',
  'estimate',
  'gloro_logits',
  'init_iterates',
  'lmt_loss',
  'make_loss',
  'margin_logits',
  'margins',
  'pairwise_bounds',
  'radii',
  'robustness_report',
  'segment_report',
  'training_loss',
]
