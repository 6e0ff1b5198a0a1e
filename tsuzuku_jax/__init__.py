"""tsuzuku_jax: Lipschitz-margin training, variance-based gradient compression, Fourier-basis
sensitivity, and normalized flat minima, on any JAX/Flax model.

Shared core: `data`, `models`, `train_lib` (models, losses, steps), `loop` (the one training loop
with checkpoints and resume), `progress` (progress lines, TensorBoard), `attacks`, `checks`,
`workdir`, `plotting`. Papers:
`lmt` (Lipschitz analysis of any traced model, certificates, margin losses); `vgc`
(compression, variance estimators, compressed all-reduce, data-parallel training, cost model);
`fourier` (Fourier basis, heat maps, black-box universal search); `flatness` (Hessian tools,
normalized flatness measures, and its submodules `pac_bayes`, `posterior`, `rank_correlation`).

Submodules load on first use (`tsuzuku_jax.lmt`, or `from tsuzuku_jax import lmt`), so importing
the package loads neither matplotlib, orbax nor scikit-learn.
"""

import importlib

_SUBMODULES = (
  'attacks', 'checks', 'data', 'flatness', 'fourier', 'lmt', 'loop', 'models', 'plotting',
  'progress', 'train_lib', 'vgc', 'workdir',
)  # fmt: skip

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted((*globals(), *_SUBMODULES))
