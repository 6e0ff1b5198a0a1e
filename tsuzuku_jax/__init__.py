"""tsuzuku_jax: Lipschitz-margin training, variance-based gradient compression, Fourier-basis
sensitivity, and normalized flat minima.

Modules: `data`, `models`, `analysis`, `lipschitz`, `lmt`, `attacks`, `train_lib`, `plotting`
(LMT); `compression`, `variance`, `collectives`, `data_parallel` (VGC); `fourier`; `flatness`,
`pac_bayes`, `rank_correlation`.
"""

from tsuzuku_jax import (
  analysis,
  attacks,
  collectives,
  compression,
  data,
  data_parallel,
  flatness,
  fourier,
  lipschitz,
  lmt,
  models,
  pac_bayes,
  plotting,
  rank_correlation,
  train_lib,
  variance,
)
from tsuzuku_jax.attacks import count_violations, pgd_l2, robust_accuracy
from tsuzuku_jax.lipschitz import (
  conv_certificate,
  dense_certificate,
  pairwise_row_certificate,
  power_iteration,
  power_iteration_step,
)
from tsuzuku_jax.lmt import (
  Certificate,
  Estimate,
  certificate,
  certified_accuracy,
  certified_radius,
  certify,
  certify_dataset,
  lmt_loss,
  margin_logits,
)

__all__ = [
  'Certificate',
  'Estimate',
  'analysis',
  'attacks',
  'certificate',
  'certify',
  'certified_accuracy',
  'certified_radius',
  'certify_dataset',
  'collectives',
  'compression',
  'conv_certificate',
  'count_violations',
  'data',
  'data_parallel',
  'dense_certificate',
  'flatness',
  'fourier',
  'lipschitz',
  'lmt',
  'lmt_loss',
  'margin_logits',
  'models',
  'pac_bayes',
  'pairwise_row_certificate',
  'pgd_l2',
  'plotting',
  'rank_correlation',
  'power_iteration',
  'power_iteration_step',
  'robust_accuracy',
  'train_lib',
  'variance',
]
