"""The Lipschitz analysis' vocabulary: input-dependent values (`Dep`), the linear maps between
them (`Linear`, built one primitive `Step` at a time, with conv/dense kernels kept so that a
following per-channel scale, an average pooling or a residual identity folds into them), their
exact float64 norms, and the error for what has no known bound."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util

from tsuzuku_jax.lmt import bounds


class UnsupportedOperation(ValueError):
  """An input-dependent value meets an operation whose Lipschitz constant is not known."""


@dataclasses.dataclass(frozen=True)
class Linear:
  """A linear map between input-dependent values of one example.

  `apply(x)` is the map (jax primitives; it runs in float32 or, under `jax.enable_x64`, in
  float64). `bound()` is a sound upper bound on its L2 operator norm from its structure;
  `kernel` describes a last conv/dense step that a following per-channel scale can fold into.
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  apply: Callable[[jax.Array], jax.Array]
  prefix_bound: Callable[[], float]  # bound of everything before `kernel` (or of all, if None)
  kernel: Any = None  # None or (kind, kernel ndarray, fold info, bound_fn(kernel, info))
  # 'identity': x -> x; 'kernel': exactly the kernel's conv/dense applied to the input (biases
  # and folded scales aside), so that x + kernel(x) folds into one kernel; '' otherwise.
  form: str = ''

  def bound(self) -> float:
    if self.kernel is None:
      return self.prefix_bound()
    return self.prefix_bound() * self.kernel[3](self.kernel[1], self.kernel[2])


def identity(shape) -> Linear:
  return Linear(tuple(shape), tuple(shape), lambda x: x, lambda: 1.0, form='identity')


def compose(step: 'Step', lin: Linear) -> Linear:
  """step o lin, folding a per-channel scale into a conv/dense kernel before it."""
  apply = lambda x: step.apply(lin.apply(x))  # noqa: E731
  if step.scale is not None and lin.kernel is not None:
    kind, kernel, info, fn = lin.kernel
    return dataclasses.replace(
      lin, out_shape=step.out_shape, apply=apply, kernel=(kind, kernel * step.scale, info, fn)
    )
  if step.pool is not None and lin.kernel is not None and lin.kernel[0] == 'conv':
    folded = _fold_pool(lin.kernel, step.pool)
    if folded is not None:
      return dataclasses.replace(lin, out_shape=step.out_shape, apply=apply, kernel=folded)
  if step.kernel is not None:
    form = 'kernel' if lin.form == 'identity' else ''
    return Linear(lin.in_shape, step.out_shape, apply, lin.bound, step.kernel, form)
  if step.transparent:
    if not step.negates:
      return dataclasses.replace(lin, out_shape=step.out_shape, apply=apply)
    if lin.kernel is None:
      return dataclasses.replace(lin, out_shape=step.out_shape, apply=apply, form='')
    kind, kernel, info, fn = lin.kernel  # -(W x) = (-W) x: the kernel keeps its exact form
    return dataclasses.replace(
      lin, out_shape=step.out_shape, apply=apply, kernel=(kind, -kernel, info, fn)
    )
  prev = lin.bound
  return Linear(lin.in_shape, step.out_shape, apply, lambda: step.bound() * prev())


def add_maps(a: Linear, b: Linear) -> Linear:
  folded = _fold_identity(a, b) or _fold_identity(b, a)
  if folded is not None:
    return folded
  return Linear(
    a.in_shape, a.out_shape, lambda x: a.apply(x) + b.apply(x), lambda: a.bound() + b.bound()
  )


def _fold_pool(kernel, pool):
  """Sum pooling (window = strides, no padding) after a stride-1 NHWC conv as one conv: the
  kernel convolved with a box of the window's size, strided by the window; the padding keeps
  the conv's low side and covers every pooled output on the high side. None if not foldable."""
  kind, k, info, fn = kernel
  (ph, pw), (sh, sw) = pool
  if not (info['nhwc'] and info['strides'] == (1, 1) and (ph, pw) == (sh, sw)):
    return None
  kh, kw = k.shape[:2]
  box = np.zeros((kh + ph - 1, kw + pw - 1, *k.shape[2:]))
  for a in range(ph):
    for b in range(pw):
      box[a : a + kh, b : b + kw] += k
  (h, w), ((hl, hh), (wl, wh)) = info['in_hw'], info['pads']
  out_h, out_w = (h + hl + hh - kh + 1) // ph, (w + wl + wh - kw + 1) // pw
  pads = (
    (hl, (out_h - 1) * ph + box.shape[0] - h - hl),
    (wl, (out_w - 1) * pw + box.shape[1] - w - wl),
  )
  if pads[0][1] > hh or pads[1][1] > wh or min(pads[0][1], pads[1][1]) < 0:
    return None  # the pooled windows reach outside what the conv's padding covered
  return kind, box, {**info, 'strides': (ph, pw), 'pads': pads}, fn


def _fold_identity(ident: Linear, lin: Linear) -> Linear | None:
  """x + W(x) as the one kernel I + W when W is a stride-1 'same' conv (identity added at the
  centre tap: the LiResNet form) or a square dense layer, applied directly to x; so that the
  product bound has ||I + W|| where the triangle inequality would give 1 + ||W||."""
  if ident.form != 'identity' or lin.form != 'kernel' or lin.in_shape != lin.out_shape:
    return None
  kind, k, info, fn = lin.kernel
  k = np.array(k, np.float64)
  if kind == 'conv':
    kh, kw, cin, cout = k.shape
    same = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    if not (info['nhwc'] and info['strides'] == (1, 1) and info['groups'] == 1 and cin == cout
            and kh % 2 and kw % 2 and info['pads'] == same):  # fmt: skip
      return None
    k[kh // 2, kw // 2] += np.eye(cin)
  elif kind == 'dense' and info['contract_last'] and k.shape[1] == k.shape[2]:
    k[0] += np.eye(k.shape[1])
  else:
    return None
  apply = lambda x: ident.apply(x) + lin.apply(x)  # noqa: E731
  return Linear(ident.in_shape, ident.out_shape, apply, lambda: 1.0, (kind, k, info, fn), 'kernel')


@dataclasses.dataclass(frozen=True)
class Step:
  """One linear primitive applied to one input-dependent operand (the others constant)."""

  out_shape: tuple[int, ...]
  apply: Callable[[jax.Array], jax.Array]
  bound: Callable[[], float]
  scale: Any = None  # a (C,) per-last-axis scale this step multiplies by (for folding)
  kernel: Any = None  # (kind, kernel, info, bound_fn) when this step is a conv or dense layer
  transparent: bool = False  # +-identity up to an offset (a bias): a kernel before it stays
  negates: bool = False  # the transparent step is -x (c - x, or neg)
  pool: Any = None  # (window (h, w), strides (h, w)) of an unpadded NHWC sum pooling


def matrix_norm(m: np.ndarray) -> float:
  return bounds._dense_bound_np(np.asarray(m, np.float64))


def matrix(lin: Linear, by_rows: bool | None = None, chunk: int = 256) -> np.ndarray:
  """The dense (n_out, n_in) float64 matrix of `lin`: column by column through the map itself,
  or row by row through its transpose (`jax.vjp`); by default whichever side is smaller."""
  n_in, n_out = math.prod(lin.in_shape), math.prod(lin.out_shape)
  by_rows = n_out < n_in if by_rows is None else by_rows
  with jax.enable_x64(True):
    if by_rows:
      _, vjp = jax.vjp(lin.apply, jnp.zeros(lin.in_shape, jnp.float64))
      fn, shape, n = jax.jit(jax.vmap(lambda y: vjp(y)[0])), lin.out_shape, n_out
    else:
      fn, shape, n = jax.jit(jax.vmap(lin.apply)), lin.in_shape, n_in
    parts = []
    for start in range(0, n, chunk):
      idx = np.arange(start, min(start + chunk, n))
      basis = np.zeros((len(idx), n), np.float64)  # unit vectors e_idx
      basis[np.arange(len(idx)), idx] = 1.0
      parts.append(np.asarray(fn(jnp.asarray(basis.reshape(len(basis), *shape))), np.float64))
  m = np.concatenate([p.reshape(len(p), -1) for p in parts])
  return m if by_rows else m.T


def exact_norm(lin: Linear) -> float:
  """||lin||_2 from its dense matrix in float64."""
  return matrix_norm(matrix(lin))


# ----------------------------------------------------------------------------- the analysis


@dataclasses.dataclass
class Dep:
  """An input-dependent value: sum over anchors of linear maps from the anchor.

  `ew` = (source, f) when the value is a scalar function f applied elementwise to another
  input-dependent value `source` (a chain of elementwise operations with scalar constants).
  A pending value (terms None, ew = (source, f, why)) is such a chain that met an operation
  with no bound of its own (erfc in an exact gelu, x * tanh(...) in the tanh gelu; `why` says
  which): it is bound as a whole, by recognising f, when a non-elementwise operation uses it.
  """

  shape: tuple[int, ...]
  terms: dict | None  # anchor index -> Linear; None while pending
  ew: tuple | None = None


def float_like(c, x):
  if isinstance(c, np.ndarray | jax.Array) and np.issubdtype(c.dtype, np.floating):
    return jnp.asarray(c, x.dtype)
  if isinstance(c, float):
    return jnp.asarray(c, x.dtype)
  return c


def params_like(params, x):
  out = dict(params)
  for key in ('preferred_element_type', 'out_dtype', 'new_dtype'):
    if out.get(key) is not None and np.issubdtype(np.dtype(out[key]), np.floating):
      out[key] = x.dtype
  return out


_LIBRARIES = ('/jax/', '/jaxlib/', '/flax/', '/optax/', '/tsuzuku_jax/lmt/')


def source_line(eqn, outer: str = '') -> str:
  """The user's source line of an equation: its innermost frame outside jax, flax and optax
  (so a relu reports the model line that called it), or the enclosing call's."""
  frames = source_info_util.user_frames(eqn.source_info.traceback)
  for f in frames:
    if not any(lib in f.file_name for lib in _LIBRARIES):
      return f'{f.file_name}:{f.start_line} ({f.function_name})'
  return outer or source_info_util.summarize(eqn.source_info)


def unsupported(eqn, why: str) -> UnsupportedOperation:
  """The error for `eqn`; `_Interpreter.run` adds the user's source line to its message."""
  e = UnsupportedOperation(why)
  e.primitive = eqn.primitive.name
  return e


@dataclasses.dataclass(frozen=True)
class Segment:
  """One linear operator between anchors and its sound bound."""

  where: str  # the source line of the nonlinearity (or output) that closed it
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  bound: float  # sound upper bound on its L2 operator norm
  exact: bool  # True: the float64 norm of its dense matrix; False: the product bound
  linear: Linear = dataclasses.field(repr=False, compare=False)
