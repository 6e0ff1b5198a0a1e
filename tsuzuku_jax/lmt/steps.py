"""Linear primitives of the analysis: for each, the `Step` of one input-dependent operand (its
map, a sound bound on its norm, what can fold into a kernel before it), the refusals of
operands it is not linear in, and the hints of primitives with no bound."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from tsuzuku_jax.lmt import bounds
from tsuzuku_jax.lmt.activations import SHAPE_ONLY
from tsuzuku_jax.lmt.operators import (
  Dep,
  Step,
  float_like,
  matrix_norm,
  params_like,
  unsupported,
)


def applier(eqn, ins, i, zero_consts: bool):
  """x -> eqn applied with x in slot i; other operands as constants (zeroed when additive)."""
  prim = eqn.primitive

  def apply(x):
    ops = []
    for j, c in enumerate(ins):
      if j == i:
        ops.append(x)
      elif isinstance(c, Dep) or (zero_consts and _is_float(c)):
        ops.append(jnp.zeros(np.shape(c) if not isinstance(c, Dep) else c.shape, x.dtype))
      else:
        ops.append(float_like(c, x))
    out = prim.bind(*ops, **params_like(eqn.params, x))
    return out[0] if prim.multiple_results else out

  return apply


def _is_float(c) -> bool:
  return isinstance(c, float) or (hasattr(c, 'dtype') and np.issubdtype(c.dtype, np.floating))


def _generic(bound_fn):
  def make(eqn, ins, i, shape):
    return Step(shape, applier(eqn, ins, i, False), lambda: bound_fn(eqn, ins, i, shape))

  return make


def refuse(eqn, ins, dep_pos) -> None:
  """Linear primitives that are not linear in these operands."""
  name = eqn.primitive.name
  if len(dep_pos) > 1 and name not in ADDITIVE:
    raise unsupported(
      eqn,
      'a product of two input-dependent values (as in layer norm, or batch norm in training '
      'mode: use inference-mode batch norm, or normalise by constants)',
    )
  if name == 'select_n' and 0 in dep_pos:
    raise unsupported(eqn, 'a selection by an input-dependent condition')
  if name == 'div' and 1 in dep_pos:
    raise unsupported(eqn, 'a division by an input-dependent value')
  if name == 'conv_general_dilated' and 1 in dep_pos:
    raise unsupported(eqn, 'the kernel of a convolution depends on the input')


def _additive(eqn, ins, i, shape):
  """add/sub/concatenate/select_n/pad: linear in each input-dependent operand once constants
  (offsets, padding values) are zeroed; a broadcast of the operand counts sqrt(copies)."""
  n_in = math.prod(ins[i].shape)
  add = eqn.primitive.name in ('add', 'sub', 'add_any')
  copies = math.prod(shape) / max(n_in, 1) if add else 1.0
  # x + bias or bias - x: the linear part is +-x, so a conv or dense kernel before it can still
  # take a following batch-norm scale.
  transparent = add and copies == 1
  negates = eqn.primitive.name == 'sub' and i == 1
  return Step(shape, applier(eqn, ins, i, True), lambda: math.sqrt(copies),
              transparent=transparent, negates=negates)  # fmt: skip


def _mul(eqn, ins, i, shape):
  c = np.asarray(ins[1 - i], np.float64)
  if eqn.primitive.name == 'div':
    c = 1.0 / c
  copies = math.prod(shape) / max(math.prod(ins[i].shape), 1)
  scale = None
  if c.ndim and c.shape[-1] == shape[-1] and c.size == shape[-1] and copies == 1:
    scale = np.asarray(c, np.float64).reshape(-1)  # per-channel: folds into a kernel before
  mx = float(np.max(np.abs(c))) if c.size else 0.0
  return Step(shape, applier(eqn, ins, i, False), lambda: math.sqrt(copies) * mx, scale=scale)


def _neg(eqn, ins, i, shape):
  return Step(shape, applier(eqn, ins, i, False), lambda: 1.0, transparent=True, negates=True)


def _dot(eqn, ins, i, shape):
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  w = np.asarray(ins[1 - i], np.float64)
  contract, batch = (rc, rb) if i == 0 else (lc, lb)
  free = [d for d in range(w.ndim) if d not in contract and d not in batch]
  w = np.transpose(w, (*batch, *contract, *free))
  nb, nc = (
    math.prod(w.shape[: len(batch)]),
    math.prod(w.shape[len(batch) : len(batch) + len(contract)]),
  )
  w = w.reshape(nb, nc, -1)

  def bound_fn(kernel, info=None):
    return max(matrix_norm(k) for k in kernel)

  # A per-channel scale on the output's last axis folds into the kernel's columns when the
  # kernel's free dimension is that axis (a dense layer x @ W).
  info = {'contract_last': tuple(lc) == (len(ins[0].shape) - 1,) and not lb}
  kernel = ('dense', w, info, bound_fn) if i == 0 and nb == 1 and len(free) == 1 else None
  return Step(shape, applier(eqn, ins, i, False), lambda: bound_fn(w), kernel=kernel)


def _conv(eqn, ins, i, shape):
  p = eqn.params
  lhs, rhs, _ = p['dimension_numbers']
  k = np.asarray(ins[1], np.float64)
  x_shape = ins[0].shape
  apply = applier(eqn, ins, 0, False)
  if len(lhs) != 4 or p['batch_group_count'] != 1 or any(d != 1 for d in p['lhs_dilation']):
    # 1-D/3-D, batch-grouped or transposed convolutions: no structured bound (exact only).
    return Step(shape, apply, lambda: _no_bound(eqn))
  # To HWIO and NHWC order: rhs spec is (out, in, spatial...), lhs spec (batch, feature, sp...).
  k = np.transpose(k, (rhs[2], rhs[3], rhs[1], rhs[0]))
  in_hw = (x_shape[lhs[2]], x_shape[lhs[3]])
  dil = p['rhs_dilation']
  if any(d != 1 for d in dil):
    kd = np.zeros(((k.shape[0] - 1) * dil[0] + 1, (k.shape[1] - 1) * dil[1] + 1, *k.shape[2:]))
    kd[:: dil[0], :: dil[1]] = k
    k = kd
  nhwc = tuple(lhs) == (0, 3, 1, 2) and tuple(p['dimension_numbers'][2]) == (0, 3, 1, 2)
  info = dict(in_hw=in_hw, strides=tuple(p['window_strides']), pads=tuple(map(tuple, p['padding'])),
              groups=p['feature_group_count'], nhwc=nhwc)  # fmt: skip

  def bound_fn(kernel, info=info):  # info: the geometry, changed by a pooling fold
    g = info['groups']
    cout = kernel.shape[3] // g
    return max(
      bounds._conv_bound_np(
        kernel[..., j * cout : (j + 1) * cout], 1.0, in_hw=info['in_hw'],
        strides=info['strides'], pads=info['pads'], exact_max_dim=bounds.EXACT_MAX_DIM,
      )
      for j in range(g)
    )  # fmt: skip

  out_last = tuple(eqn.params['dimension_numbers'][2])[1] == len(shape) - 1
  kernel = ('conv', k, info, bound_fn) if out_last else None
  return Step(shape, apply, lambda: bound_fn(k), kernel=kernel)


def _no_bound(eqn):
  raise unsupported(eqn, 'too large for the exact bound and no structured bound is known')


def _one(eqn, ins, i, shape):
  return 1.0


def _broadcast(eqn, ins, i, shape):
  return math.sqrt(math.prod(shape) / max(math.prod(ins[i].shape), 1))


def _reduce_sum(eqn, ins, i, shape):
  return math.sqrt(math.prod(ins[i].shape) / max(math.prod(shape), 1))


def _window_sum(eqn, ins, i, shape):
  p = eqn.params
  n = bounds.pool_overlap(ins[i].shape, p['window_dimensions'], p['window_strides'],
                             p['padding'])  # fmt: skip
  return math.sqrt(n * math.prod(p['window_dimensions']))


def _pool_step(eqn, ins, i, shape):
  """Sum pooling: its own bound, and for an unpadded NHWC pooling with window = strides, what
  folds into a stride-1 conv before it (so a product bound has the pooled conv's norm)."""
  step = _generic(_window_sum)(eqn, ins, i, shape)
  p = eqn.params
  win, st = tuple(p['window_dimensions']), tuple(p['window_strides'])
  plain = (len(win) == 4 and win[0] == win[3] == st[0] == st[3] == 1
           and all(d == 1 for d in (*p['base_dilation'], *p['window_dilation']))
           and all(tuple(q) == (0, 0) for q in p['padding']))  # fmt: skip
  return dataclasses.replace(step, pool=(win[1:3], st[1:3])) if plain else step


def _cumsum(eqn, ins, i, shape):
  n = ins[i].shape[eqn.params['axis']]
  return 1.0 / (2.0 * math.sin(math.pi / (4 * n + 2)))  # largest singular value, exact


ADDITIVE = ('add', 'sub', 'concatenate', 'select_n', 'pad', 'add_any')
STEPS = {
  'add': _additive,
  'add_any': _additive,
  'sub': _additive,
  'concatenate': _additive,
  'select_n': _additive,
  'pad': _additive,
  'mul': _mul,
  'div': _mul,
  'neg': _neg,
  'dot_general': _dot,
  'conv_general_dilated': _conv,
  'broadcast_in_dim': _generic(_broadcast),
  'reduce_sum': _generic(_reduce_sum),
  'reduce_window_sum': _pool_step,
  'cumsum': _generic(_cumsum),
  **{n: _generic(_one) for n in SHAPE_ONLY if n != 'pad'},
}
_NORM = (
  ' (the variance of layer norm or of batch norm in training mode? use inference-mode batch'
  ' norm, or normalise by constants)'
)
HINTS = {
  'exp': 'exp is not Lipschitz on the reals (a softmax? return logits, not probabilities)',
  'log': 'log is not Lipschitz',
  'integer_pow': 'a power is not Lipschitz on the reals' + _NORM,
  'square': 'a square is not Lipschitz on the reals' + _NORM,
  'rsqrt': 'a data-dependent normalisation (use inference-mode batch norm)',
  'sqrt': 'sqrt is not Lipschitz at 0',
  'gather': 'a gather (indexing)',
}
