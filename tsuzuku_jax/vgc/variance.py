"""Per-element variance estimates of a minibatch-mean gradient, for variance-based compression.

All three estimators return `((loss, aux), grads, s)` for a loss `loss_fn(params, batch) ->
(loss, aux)` that is a mean over the B examples of `batch` (a dict of arrays with leading axis
B). `grads` is the minibatch gradient and `s` estimates, per parameter element,

    s_i = (1 / B^2) * sum_z (d f_z / d theta_i)^2,

the quantity of Tsuzuku et al. (2018): an upper bound on the variance of the mean gradient
(it keeps the mean's square, dropping the -g_i^2 / B term), which VGC accumulates and compares
with the accumulated gradient.

- `per_example`: exact, from `vmap(grad)` over examples (B backward passes' memory). The oracle.
- `cheap`: the paper's estimator. For a dense layer y = x W + b the per-example gradient is
  x_z delta_z^T, so sum_z (x_z delta_z)^2 = (x*x)^T (delta*delta): one extra matmul of the weight
  gradient's shape. delta (the cotangent of each layer's output) is captured by adding a zero
  perturbation to the output inside `flax.linen.intercept_methods`, and x by the same
  interceptor, so it works on any loss that calls Flax `nn.Dense` (2-D inputs) and `nn.Conv`
  (2-D, ungrouped, undilated) without changing the model. A conv kernel's
  per-example gradient sums over output positions, so there the squares cannot be taken before
  the sum: it is formed per example from im2col patches (one batched matmul with the weight
  gradient's FLOPs, B times its memory) and squared. Any other parameter raises, naming it.
- `microbatch`: any differentiable model. Splits the batch into m micro-batches, takes their
  mean gradients g_j, and returns an unbiased estimate of the same s from their first two
  moments (exact when the micro-batch size is 1). Costs m smaller backward passes.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsuzuku_jax.models import conv_pads

LossFn = Callable[[Any, dict], tuple[jax.Array, Any]]


def _batch_size(batch: dict) -> int:
  sizes = {v.shape[0] for v in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f'batch arrays must share one leading (batch) axis, got sizes {sizes}')
  return sizes.pop()


def per_example(loss_fn: LossFn, params, batch: dict):
  """Exact s from per-example gradients (`vmap(grad)`); the test oracle.

  Returns:
    `((loss, aux), grads, s)`; grads is the mean of the per-example gradients.
  """
  b = _batch_size(batch)
  (loss, aux), _ = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)

  def one(example):
    ex = jax.tree.map(lambda a: a[None], example)
    return jax.grad(lambda p: loss_fn(p, ex)[0])(params)

  per = jax.vmap(one)(batch)
  grads = jax.tree.map(lambda g: jnp.mean(g, 0), per)
  s = jax.tree.map(lambda g: jnp.sum(jnp.square(g), 0) / b**2, per)
  return (loss, aux), grads, s


def microbatch(loss_fn: LossFn, params, batch: dict, num_microbatches: int):
  """Unbiased estimate of s from the gradients of `num_microbatches` equal micro-batches.

  With micro-batch means g_j of size b = B / m, S = mean_j g_j^2 and G = mean_j g_j:
  E[S] = sigma^2 / b + mu^2 and E[G^2] = sigma^2 / B + mu^2 per element, so
  sigma^2 ~ (S - G^2) b m / (m - 1) and s = (S + (1 - 1/b) sigma^2) / B has the expectation of
  the per-example s. Clamped at 0 (a rare negative estimate would make the test always pass).

  Raises:
    ValueError: m < 2, or m does not divide the batch size.
  """
  b_total = _batch_size(batch)
  m = num_microbatches
  if m < 2 or b_total % m:
    raise ValueError(f'num_microbatches must be >= 2 and divide the batch size {b_total}, got {m}')
  b = b_total // m
  split = jax.tree.map(lambda a: a.reshape(m, b, *a.shape[1:]), batch)
  (loss, aux), g = jax.vmap(jax.value_and_grad(loss_fn, has_aux=True), in_axes=(None, 0))(
    params, split
  )
  # A sum of the m slices: XLA:CPU reduces a small leading axis of a large array slowly.
  mean = lambda t: jax.tree.map(lambda a: sum(a[j] for j in range(m)) / m, t)
  grads = mean(g)

  def estimate(gj, gm):
    s2 = sum(jnp.square(gj[j]) for j in range(m)) / m
    if b == 1:
      return s2 / b_total
    sigma2 = (s2 - jnp.square(gm)) * (b * m / (m - 1))
    return jnp.maximum(s2 + (1 - 1 / b) * sigma2, 0.0) / b_total

  return (mean(loss), mean(aux)), grads, jax.tree.map(estimate, g, grads)


def _key(path: tuple[str, ...]) -> str:
  return '/'.join(path)


def _tappable(module: nn.Module) -> str | None:
  if isinstance(module, nn.Dense):
    return 'dense'
  if isinstance(module, nn.Conv):
    return 'conv'
  return None


def _pair(v, n: int = 2) -> tuple[int, ...]:
  return (v,) * n if isinstance(v, int) else tuple(v)


def _conv_geometry(module: nn.Conv, x: jax.Array, key: str):
  """(strides, explicit pads) of a plain 2-D conv, or a ValueError naming what is not."""
  ks = _pair(module.kernel_size)
  plain = (
    x.ndim == 4
    and len(ks) == 2
    and module.feature_group_count == 1
    and _pair(module.input_dilation or 1) == (1, 1)
    and _pair(module.kernel_dilation or 1) == (1, 1)
    and module.padding not in ('CIRCULAR', 'CAUSAL', 'REFLECT')
  )
  if not plain:
    raise ValueError(
      f'variance.cheap: conv {key!r} is not a plain 2-D convolution (grouped, dilated, '
      f'circular or not NHWC: input {x.shape}); use variance.microbatch'
    )
  strides = _pair(module.strides or 1)
  pad = module.padding
  if isinstance(pad, str):
    return strides, conv_pads(x.shape[1:3], ks, strides, pad)
  pad = [(p, p) if isinstance(p, int) else tuple(p) for p in _pair(pad)]
  return strides, pad


def _run_tapped(loss_fn, params, batch, perts):
  """Calls loss_fn; returns ((loss, aux), {path: (kind, module, x, output shape/dtype)})."""
  taps = {}

  def interceptor(f, args, kwargs, ctx):
    kind = _tappable(ctx.module) if ctx.method_name == '__call__' else None
    if kind is None:
      return f(*args, **kwargs)
    key = _key(ctx.module.path)
    if key in taps:
      raise ValueError(
        f'variance.cheap: module {key!r} is called more than once in one loss evaluation '
        '(shared weights, or a loss that applies the model twice: compute the logits once)'
      )
    x = args[0]
    if kind == 'conv':
      _conv_geometry(ctx.module, x, key)
    if kind == 'dense' and x.ndim != 2:
      raise ValueError(
        f'variance.cheap: dense layer {key!r} has a {x.ndim}-D input {x.shape}; the cheap '
        'estimator needs (batch, features) inputs: use variance.microbatch'
      )
    out = f(*args, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    if perts is not None:
      y = y + perts[key]
    taps[key] = (kind, ctx.module, x, jax.ShapeDtypeStruct(y.shape, y.dtype))
    return (y, *out[1:]) if isinstance(out, tuple) else y

  with nn.intercept_methods(interceptor):
    result = loss_fn(params, batch)
  return result, taps


def _subtree(params, key: str):
  node = params
  for name in key.split('/'):
    node = node[name]
  return node


def _conv_sum_sq(module, kernel, x, delta):
  """sum_z (per-example kernel gradient)^2 of an nn.Conv from its input and output cotangent.

  The per-example gradient is sum_p patch_{z,p} delta_{z,p}^T over output positions p: one
  batched matmul of the im2col patches with the cotangent (the weight gradient's FLOPs, with a
  (B, kh kw Cin, Cout) output instead of its sum over B).
  """
  kh, kw, cin, cout = kernel.shape
  strides, pads = _conv_geometry(module, x, '')
  patches = jax.lax.conv_general_dilated_patches(
    x, (kh, kw), strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )  # (B, H', W', cin * kh * kw), features ordered (cin, kh, kw)
  b = x.shape[0]
  per = jnp.einsum(
    'bpk,bpo->bko', patches.reshape(b, -1, cin * kh * kw), delta.reshape(b, -1, cout)
  )
  s = jnp.sum(jnp.square(per), 0).reshape(cin, kh, kw, cout)
  return jnp.transpose(s, (1, 2, 0, 3))


def cheap(loss_fn: LossFn, params, batch: dict):
  """The paper's estimator: s from layer inputs and output cotangents (see module docstring).

  Raises:
    ValueError: a parameter outside the supported layers (named), a dense layer with a
      non-2-D input, or a layer called twice.
  """
  found = {}

  def discover(p):
    result, taps = _run_tapped(loss_fn, p, batch, None)
    found.update({k: (t[0], t[1], t[3]) for k, t in taps.items()})  # no tracers kept
    return result

  jax.eval_shape(discover, params)
  shapes = {k: (kind, module, None, shape) for k, (kind, module, shape) in found.items()}
  perts = {k: jnp.zeros(v[3].shape, v[3].dtype) for k, v in shapes.items()}
  covered = set()  # exactly the leaves filled below
  for k in shapes:
    covered.update(f'{k}/{name}' for name in ('kernel', 'bias') if name in _subtree(params, k))
  missing = [
    '/'.join(str(getattr(p, 'key', p)) for p in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(params)
    if '/'.join(str(getattr(p, 'key', p)) for p in path) not in covered
  ]
  if missing:
    raise ValueError(
      f'variance.cheap covers nn.Dense and nn.Conv; parameters {missing} are outside '
      'them: use variance.microbatch'
    )

  def f(p, q):
    (loss, aux), taps = _run_tapped(loss_fn, p, batch, q)
    return loss, (aux, {k: t[2] for k, t in taps.items()})

  (loss, (aux, inputs)), (grads, deltas) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
    params, perts
  )
  s = _to_dict(jax.tree.map(jnp.zeros_like, grads))
  for k, (kind, module, _, _) in shapes.items():
    x, delta = inputs[k], deltas[k]
    node = _subtree(s, k)
    sub = _subtree(params, k)
    if kind == 'dense':
      node['kernel'] = jnp.square(x).T @ jnp.square(delta)
    else:
      node['kernel'] = _conv_sum_sq(module, sub['kernel'], x, delta)
    if 'bias' in sub:
      axes = tuple(range(delta.ndim - 1))[1:]
      node['bias'] = jnp.sum(jnp.square(jnp.sum(delta, axes) if axes else delta), 0)
  return (loss, aux), grads, s


def _to_dict(tree):
  """Nested dicts (a copy) of a params-like tree, so leaves can be assigned by path."""
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


ESTIMATORS = ('cheap', 'microbatch', 'per_example')


def estimator(name: str, num_microbatches: int = 4) -> Callable:
  """`name` -> `f(loss_fn, params, batch) -> ((loss, aux), grads, s)`."""
  if name == 'cheap':
    return cheap
  if name == 'per_example':
    return per_example
  if name == 'microbatch':
    return lambda loss_fn, params, batch: microbatch(loss_fn, params, batch, num_microbatches)
  raise ValueError(f'variance estimator must be one of {ESTIMATORS}, got {name!r}')
