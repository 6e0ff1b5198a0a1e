"""Random model variables for tests, drawn with numpy (compiling jax.random per layer is slow)."""

import jax
import numpy as np


def random_variables(shapes, rng: np.random.Generator):
  """Random variables with the shapes of `model.init` (e.g. from `jax.eval_shape`).

  Kernels ~ N(0, 1/fan_in); BN scales, running means and variances random so that batch norm is
  far from the identity and the folded conv + BN bounds are exercised.
  """

  def leaf(path, x):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0.0, 1 / np.sqrt(np.prod(x.shape[:-1])), x.shape).astype(np.float32)
    if name in ('bias', 'mean'):
      return rng.normal(0.0, 0.3, x.shape).astype(np.float32)
    if name == 'var':
      return rng.uniform(0.3, 3.0, x.shape).astype(np.float32)
    if name == 'scale':
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    raise AssertionError(f'unexpected variable {jax.tree_util.keystr(path)}')

  return jax.tree_util.tree_map_with_path(leaf, dict(shapes))
