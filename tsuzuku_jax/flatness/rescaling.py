"""Random neuron-wise rescalings that leave a ReLU network's function unchanged: the test of
the normalized measures' invariance (`flatness.measures`), which the raw ones fail.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax.flatness.hessian import PyTree


def rescale_neurons(
  params: PyTree,
  layers: list[str],
  *,
  key: jax.Array,
  low: float = 0.1,
  high: float = 10.0,
  kernel: str = 'kernel',
  bias: str = 'bias',
) -> PyTree:
  """A random neuron-wise rescaling that leaves a ReLU network's function unchanged: hidden
  unit (or conv output channel) j of layer l gets a factor c_j, log-uniform in [low, high]
  (its kernel's output column or filter and bias times c_j, the next layer's input row or
  channel divided by c_j; relu(c z) = c relu(z) and max_pool(c z) = c max_pool(z) for c > 0).

  Args:
    params: a pytree holding `params[name][kernel]` (a Dense (in, out) or a Conv
      (kh, kw, in, out) kernel) and optionally `params[name][bias]` for every name in `layers`.
    layers: the layer names in forward order; units between consecutive layers are rescaled.
      After a conv, the next layer is a conv (its input channels) or a Dense layer on the
      flattened NHWC feature map (its rows, channel fastest).

  Raises:
    ValueError: the next layer's input size does not match the channels (naming both layers).
  """
  if not 0 < low <= high:
    raise ValueError(f'need 0 < low <= high, got low={low}, high={high}')
  out = jax.tree.map(lambda x: x, params)
  for i, (name, nxt) in enumerate(zip(layers[:-1], layers[1:], strict=True)):
    w = out[name][kernel]
    c = jnp.exp(
      jax.random.uniform(
        jax.random.fold_in(key, i), w.shape[-1:], w.dtype, np.log(low), np.log(high)
      )
    )
    out[name] = {**out[name], kernel: w * c}
    if bias in out[name]:
      out[name][bias] = out[name][bias] * c
    v = out[nxt][kernel]
    n_in = v.shape[-2]
    if v.ndim == 4 and n_in == c.size:  # conv: input channels
      v = v / c[:, None]
    elif v.ndim == 2 and n_in % c.size == 0:  # dense: rows, or a flattened NHWC map's rows
      v = v / jnp.tile(c, n_in // c.size)[:, None]
    else:
      raise ValueError(
        f'rescale_neurons: {nxt!r} takes {n_in} inputs per position, which does not match the '
        f'{c.size} units of {name!r}'
      )
    out[nxt] = {**out[nxt], kernel: v}
  return out
