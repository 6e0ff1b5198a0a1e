"""tsuzuku_jax: Lipschitz-margin training, variance-based gradient compression, Fourier-basis
sensitivity, and normalized flat minima, on any JAX/Flax model.

Shared core: `data`, `models`, `train_lib`, `attacks`, `checks`, `workdir`, `plotting`. Papers:
`lmt` (Lipschitz analysis of any traced model, certificates, margin losses); `compression`,
`variance`, `collectives`, `data_parallel` (VGC); `fourier`; `flatness` (normalized flat minima;
its `flatness.pac_bayes`, `flatness.posterior` and `flatness.rank_correlation` hold the
PAC-Bayes bounds, posteriors and rank correlations).

Submodules load on first use (`tsuzuku_jax.lmt`, or `from tsuzuku_jax import lmt`), so importing
the package loads neither matplotlib, orbax nor scikit-learn.
"""

import importlib

_SUBMODULES = (
  'attacks', 'checks', 'collectives', 'compression', 'data', 'data_parallel', 'flatness',
  'fourier', 'lmt', 'models', 'plotting', 'train_lib', 'variance', 'workdir',
)  # fmt: skip

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted((*globals(), *_SUBMODULES))
