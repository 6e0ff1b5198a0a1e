"""Lipschitz analysis of any JAX function of the input, read from its jaxpr.

`certificate(apply_fn, variables, input_shape)` traces `apply_fn(variables, x)` for one example
and interprets the jaxpr (recursing into `jit`, `custom_jvp_call` and `custom_vjp_call`),
following every value that depends on the input. Values that do not (parameters, batch-norm
scales, normalisation constants) are computed concretely. An input-dependent value is kept as
a sum of *linear maps* from "anchors": the input itself, or the output of a nonlinearity. So
every maximal run of linear operations with no nonlinearity between them (a conv, its batch-norm
scale, an average pool, a residual sum of two branches from the same anchor, a reshape, the
dense head) is one operator, bounded as one:

- exactly, when its dense matrix is small enough (at most `exact_max_entries` entries): the
  largest singular value of the matrix computed in float64 (columns by forward application,
  or rows by its transpose through `jax.vjp`), times (1 + CERT_RTOL);
- otherwise, by the product of sound bounds of its steps (float64 SVD of a dense kernel, the
  circular-embedding FFT bound of a zero-padded strided convolution with a following per-
  channel scale, an unpadded average pooling (window = stride) or a residual identity folded
  into its kernel, sqrt(multiplicity) for broadcasts, sqrt(n) for sums,
  max |c| for a constant scale, 1 for reshapes, slices and pads), and the sum of the bounds of
  the branches of a merge (triangle inequality).

A nonlinearity with Lipschitz constant f (relu, leaky relu, abs, tanh, logistic, elu, softplus,
silu, max/min with a constant, a sort (GroupSort / MinMax), max pooling with its overlap factor,
the elementwise max or min of two input-dependent values) closes the operator before it: the
anchor it creates has the bound f * sum over the operator's anchors of ||A|| * L(anchor). The
logits' map is handled last: the bound on x -> z_i - z_j is sum over anchors of
L(anchor) * ||(e_i - e_j)^T A||, the exact float64 norm of a row difference of that last
operator (the pairwise head bound of LMT's Proposition 2, GloRo and LiResNet, taken through
everything after the last nonlinearity).

LMT's training estimate (`estimate`) walks the same jaxpr the same way, with the parameters
traced, and replaces each segment's bound by one power-iteration step (`jax.vjp` of the segment's
own map) from a persistent iterate keyed by the segment (`init_iterates`).

Guarantee: the resulting bounds are >= the Lipschitz constants (L2 to L2) of the real-number
function the jaxpr computes with the given float32 parameters, when every example is processed
independently (the function is traced for one example). Anything else on the input's path (a
product of two input-dependent values, as in layer norm or batch norm in training mode; a
division by one; softmax; a sort by keys; integer casts; an unknown primitive) stops the
analysis with an `UnsupportedOperation` naming the primitive and the user's source line.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util

from tsuzuku_jax import lipschitz

# Dense matrices of linear segments up to this many entries are bounded exactly (float64 SVD).
EXACT_MAX_ENTRIES = 2**24
_RTOL = lipschitz.CERT_RTOL


class UnsupportedOperation(ValueError):
  """An input-dependent value meets an operation whose Lipschitz constant is not known."""


# ----------------------------------------------------------------------------- linear maps


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


def _identity(shape) -> Linear:
  return Linear(tuple(shape), tuple(shape), lambda x: x, lambda: 1.0, form='identity')


def _compose(step: 'Step', lin: Linear) -> Linear:
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


def _sum(a: Linear, b: Linear) -> Linear:
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


def _matrix_norm(m: np.ndarray) -> float:
  return lipschitz._dense_bound_np(np.asarray(m, np.float64))


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
  return _matrix_norm(matrix(lin))


# ----------------------------------------------------------------------------- the analysis


@dataclasses.dataclass
class _Dep:
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


@dataclasses.dataclass(frozen=True)
class Segment:
  """One linear operator between anchors and its sound bound."""

  where: str  # the source line of the nonlinearity (or output) that closed it
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  bound: float  # sound upper bound on its L2 operator norm
  exact: bool  # True: the float64 norm of its dense matrix; False: the product bound
  linear: Linear = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Certificate:
  """Sound Lipschitz bounds of a classifier's logits (from `certificate`; never an estimate).

  Guarantee: for every pair (i, j), x -> z_i(x) - z_j(x) is `pairwise[i, j]`-Lipschitz in L2
  (pixel units), and x -> z(x) is `lipschitz`-Lipschitz, for the function traced with these
  parameters (see the module docstring for the assumptions).
  """

  pairwise: np.ndarray  # (K, K) float32, rounded up; the diagonal is 0
  lipschitz: float  # bound on the whole logit map, rounded up
  segments: tuple[Segment, ...]
  input_shape: tuple[int, ...]


_LIBRARIES = ('/jax/', '/jaxlib/', '/flax/', '/optax/', '/tsuzuku_jax/analysis.py')


def _where(eqn, outer: str = '') -> str:
  """The user's source line of an equation: its innermost frame outside jax, flax and optax
  (so a relu reports the model line that called it), or the enclosing call's."""
  frames = source_info_util.user_frames(eqn.source_info.traceback)
  for f in frames:
    if not any(lib in f.file_name for lib in _LIBRARIES):
      return f'{f.file_name}:{f.start_line} ({f.function_name})'
  return outer or source_info_util.summarize(eqn.source_info)


def _unsupported(eqn, why: str) -> UnsupportedOperation:
  """The error for `eqn`; `_Interpreter.run` adds the user's source line to its message."""
  e = UnsupportedOperation(why)
  e.primitive = eqn.primitive.name
  return e


# Elementwise nonlinearities by primitive, and named jitted activations (jax.nn / flax), with
# their Lipschitz constants: sup |f'| over the reals, rounded up.
_ELEMENTWISE = {'abs': 1.0, 'tanh': 1.0, 'logistic': 0.25}
_NAMED = {
  'relu': 1.0,
  'relu6': 1.0,
  'hard_tanh': 1.0,
  'softplus': 1.0,
  'soft_sign': 1.0,
  'log_sigmoid': 1.0,
  'silu': 1.0999,  # max of sigma(x)(1 + x(1 - sigma(x))): 1.099839 at x = 2.3994
  'swish': 1.0999,
  'gelu': 1.1291,  # Phi(x) + x phi(x): 1.128904 at x = sqrt(2) (1.128993 for the tanh form)
  'sigmoid': 0.25,
  'hard_sigmoid': 1 / 6 + 1e-7,
}
_ELEMENTWISE_CALLS = frozenset((*_NAMED, 'leaky_relu', 'elu', 'celu', 'selu', 'logaddexp'))
_CALLS = ('pjit', 'jit', 'closed_call', 'core_call', 'remat', 'checkpoint', 'custom_jvp_call',
          'custom_vjp_call', 'custom_vjp_call_jaxpr')  # fmt: skip
_SHAPE_ONLY = ('reshape', 'transpose', 'squeeze', 'expand_dims', 'rev', 'copy', 'copy_p',
               'slice', 'pad', 'dynamic_slice', 'convert_element_type', 'stop_gradient',
               'optimization_barrier')  # fmt: skip


def _sub_jaxpr(eqn):
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if key in eqn.params:
      j = eqn.params[key]
      return (j.jaxpr, j.consts) if hasattr(j, 'jaxpr') else (j, ())
  return None


def _named_constant(eqn) -> float | None:
  """The Lipschitz constant of a named activation call (leaky relu and elu read their slope)."""
  name = eqn.params.get('name')
  if name in _NAMED:
    return _NAMED[name]
  if name in ('leaky_relu', 'elu', 'celu', 'selu'):
    sub = _sub_jaxpr(eqn)
    consts = [
      abs(float(v.val))
      for e in sub[0].eqns
      if e.primitive.name == 'mul'
      for v in e.invars
      if isinstance(v, jex.core.Literal)
    ]
    slope = max(consts, default=1.0)
    return max(1.0, slope) * (1.0507009873554805 if name == 'selu' else 1.0) * (1 + 1e-7)
  return None


_ELEMENTWISE_PRIMS = frozenset(
  ('mul', 'add', 'sub', 'div', 'neg', 'tanh', 'logistic', 'erf', 'erfc', 'exp', 'expm1',
   'log1p', 'log', 'integer_pow', 'pow', 'max', 'min', 'abs', 'copy', 'copy_p', 'sqrt', 'rsqrt',
   'square', 'sin', 'cos', 'sign')
)  # fmt: skip


def _chain_fn(eqn, ins) -> Callable[[jax.Array], jax.Array]:
  """t -> the equation applied to the scalar functions of its input-dependent operands."""
  fns = [(x.ew[1] if x.ew else None, True) if isinstance(x, _Dep) else (x, False) for x in ins]

  sub = _sub_jaxpr(eqn) if eqn.primitive.name in _CALLS else None

  def f(t):
    ops = []
    for fn_or_const, dep in fns:
      if dep:
        ops.append(t if fn_or_const is None else fn_or_const(t))
      else:
        ops.append(
          _float_like(jnp.reshape(fn_or_const, ()) if np.ndim(fn_or_const) else fn_or_const, t)
        )
    if sub is not None:  # a named elementwise activation: its body on these operands
      return jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(sub[0], sub[1]))(*ops)[0]
    return eqn.primitive.bind(*ops, **_params_like(eqn.params, t))

  return f


def _gelu_tanh(t):
  return 0.5 * t * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))


# Activations recognised by their values, with sup |f'| over the reals rounded up (maxima found
# in 30-digit arithmetic: gelu 1.128904 at sqrt(2), tanh-gelu 1.128993 at 1.4185, silu
# 1.099839 at 2.3994, mish 1.088498 at 1.4906; each minimum of f' is smaller in magnitude).
_KNOWN = {
  'gelu': (lambda t: 0.5 * t * jax.scipy.special.erfc(-t / math.sqrt(2)), 1.1291),
  'gelu (tanh approximation)': (_gelu_tanh, 1.1291),
  'silu': (lambda t: t * jax.nn.sigmoid(t), 1.0999),
  'mish': (lambda t: t * jnp.tanh(jax.nn.softplus(t)), 1.0886),
  'softplus': (jax.nn.softplus, 1.0),
  'elu': (jax.nn.elu, 1.0),
}


def recognise(f: Callable[[jax.Array], jax.Array], why: str) -> float:
  """The Lipschitz constant of the scalar function f, applied elementwise, if f is one of the
  known activations: it must agree with one to 1e-5 relative on 20,001 points of [-40, 40]
  (evaluated in float32, as the model computes it).
  `why`: the first operation of the chain that had no bound of its own (for the error)."""
  with jax.ensure_compile_time_eval():  # concrete also inside a traced training step
    t = jnp.linspace(-40.0, 40.0, 20001, dtype=jnp.float32)
    got = np.asarray(f(t), np.float64)
    wants = [(np.asarray(g(t), np.float64), lip) for g, lip in _KNOWN.values()]
  for want, lip in wants:
    if np.all(np.abs(got - want) <= 1e-5 * (1 + np.abs(want))):
      return lip
  e = UnsupportedOperation(
    f'{why}; nor is the elementwise chain it belongs to a known activation '
    f'({", ".join(_KNOWN)}, relu, leaky relu, tanh, sigmoid, abs, max, min)'
  )
  e.located = True
  raise e


class _Interpreter:
  """Certificate mode (`iterates` None): sound float bounds. Estimate mode (`iterates` a dict of
  power-iteration vectors keyed by segment, or a PRNG key to draw them): one power-iteration
  step per segment, as jax values differentiable in the parameters (LMT's training estimate).
  Both modes walk the same jaxpr the same way, so segment i is the same operator in each."""

  def __init__(self, exact_max_entries: int, iterates: Any = None):
    self.exact_max_entries = exact_max_entries
    self.iterates = iterates
    self.estimating = iterates is not None
    self.next_iterates: dict[str, jax.Array] = {}
    # Lipschitz bound of each anchor w.r.t. the input, computed when first needed (so chains
    # that turn out to be part of a larger elementwise function cost nothing).
    self.anchor_fns: list[Callable[[], float]] = []
    self.anchor_cache: dict[int, float] = {}
    self.segments: list[Segment] = []

  # -- bookkeeping ---------------------------------------------------------------------------

  def bound(self, lin: Linear) -> tuple[Any, bool]:
    if self.estimating:
      return self.estimate(lin), False
    if math.prod(lin.in_shape) * math.prod(lin.out_shape) <= self.exact_max_entries:
      return exact_norm(lin) * (1 + _RTOL), True
    return lin.bound() * (1 + _RTOL), False

  def estimate(self, lin: Linear) -> jax.Array:
    """One power-iteration step on the segment from its persistent iterate."""
    key = _segment_key(len(self.segments))
    if isinstance(self.iterates, dict):
      if key not in self.iterates or self.iterates[key].shape != lin.in_shape:
        raise ValueError(
          f'the iterates do not fit this model: segment {key} takes shape {lin.in_shape}, '
          f'the iterates have {getattr(self.iterates.get(key), "shape", "none")} (build them '
          'with init_iterates for this model)'
        )
      u = self.iterates[key]
    else:  # a PRNG key: draw the first iterate
      u = jax.random.normal(jax.random.fold_in(self.iterates, len(self.segments)), lin.in_shape)
    sigma, self.next_iterates[key] = lipschitz.power_iteration_step(lin.apply, u)
    return sigma

  def lipschitz(self, a: int) -> Any:
    if a not in self.anchor_cache:
      v = self.anchor_fns[a]()
      self.anchor_cache[a] = v if self.estimating else float(v)
    return self.anchor_cache[a]

  def close(self, dep: _Dep, where: str) -> float:
    """The sound Lipschitz bound of `dep` w.r.t. the input (recording its segments)."""
    total = 0.0
    for a, lin in dep.terms.items():
      b, exact = self.bound(lin)
      self.segments.append(Segment(where, lin.in_shape, lin.out_shape, b, exact, lin))
      total += b * self.lipschitz(a)
    return total * (1 + 1e-12)

  def anchor(self, shape, bound_fn: Callable[[], float]) -> _Dep:
    self.anchor_fns.append(bound_fn)
    return _Dep(tuple(shape), {len(self.anchor_fns) - 1: _identity(shape)})

  def nonlinear(self, deps: Sequence[_Dep], factor: float, shape, where: str) -> _Dep:
    """An anchor for f(deps): L <= factor * sqrt(sum L(dep)^2) (one dep: factor * L(dep))."""
    deps = [self.resolve(d, where) for d in deps]

    def bound_fn():
      ls = [self.close(d, where) for d in deps]
      if len(ls) == 1:
        return factor * ls[0] * (1 + 1e-12)
      sqrt = jnp.sqrt if self.estimating else math.sqrt
      return factor * sqrt(sum(v * v for v in ls)) * (1 + 1e-12)

    return self.anchor(shape, bound_fn)

  def resolve(self, dep: _Dep, where: str) -> _Dep:
    """A pending elementwise chain f(source), bound as one function: f is recognised among
    the known activations by its values (`recognise`)."""
    if dep.terms is not None:
      return dep
    source, f, why = dep.ew
    out = self.nonlinear([source], recognise(f, why), dep.shape, where)
    out.ew = dep.ew[:2]
    return out

  # -- interpretation ------------------------------------------------------------------------

  def run(self, jaxpr, consts, args, outer: str = ''):
    env = {}

    def read(v):
      return v.val if isinstance(v, jex.core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
      env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
      env[v] = a
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if not any(isinstance(x, _Dep) for x in ins):
        outs = _bind(eqn, ins)
        if not self.estimating:  # concrete values, for the bounds' float64 arithmetic
          outs = [np.asarray(o) if hasattr(o, 'dtype') else o for o in outs]
      else:
        where = _where(eqn, outer)
        try:
          outs = self.elementwise(eqn, ins, where)
          if outs is None:
            ins = [self.resolve(x, where) if isinstance(x, _Dep) else x for x in ins]
            outs = self.eqn(eqn, ins, where)
        except UnsupportedOperation as e:
          if not getattr(e, 'located', False):  # the innermost equation names the line
            e.located = True
            e.args = (f'{e.primitive} on an input-dependent value at {where}: {e.args[0]}',)
          raise
      for v, o in zip(eqn.outvars, outs, strict=True):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def elementwise(self, eqn, ins, where: str) -> list | None:
    """Extends elementwise chains: the result of an elementwise primitive on input-dependent
    values that are all elementwise functions of one source (scalar constants only) records
    its scalar function. It is bound the usual way where a rule applies (a scale, tanh, ...);
    otherwise it stays pending until used. None: not an elementwise continuation."""
    named = eqn.primitive.name in _CALLS and eqn.params.get('name') in _ELEMENTWISE_CALLS
    if not (eqn.primitive.name in _ELEMENTWISE_PRIMS or named) or len(eqn.outvars) != 1:
      return None
    shape = tuple(eqn.outvars[0].aval.shape)
    sources = {}
    for x in ins:
      if isinstance(x, _Dep):
        if x.shape != shape:
          return None
        src = x.ew[0] if x.ew else x
        sources[id(src)] = src
      elif np.size(x) != 1:
        return None  # a per-element constant: not one scalar function
    if len(sources) != 1:
      return None
    ew = (next(iter(sources.values())), _chain_fn(eqn, ins))
    why = next((x.ew[2] for x in ins if isinstance(x, _Dep) and x.terms is None), None)
    if why is None:
      try:
        out = self.eqn(eqn, ins, where)
        out[0].ew = ew
        return out
      except UnsupportedOperation as e:
        why = f'{eqn.primitive.name} on an input-dependent value at {where}: {e.args[0]}'
    return [_Dep(shape, None, (*ew, why))]

  def eqn(self, eqn, ins, where: str) -> list:
    name = eqn.primitive.name
    shape = tuple(eqn.outvars[0].aval.shape)
    deps = [x for x in ins if isinstance(x, _Dep)]
    if name in _CALLS:
      factor = _named_constant(eqn)
      if factor is not None and len(deps) == 1 and len(eqn.outvars) == 1:
        return [self.nonlinear(deps, factor, shape, where)]
      sub = _sub_jaxpr(eqn)
      if sub is None:
        raise _unsupported(eqn, 'a call whose body is not a jaxpr')
      return self.run(sub[0], sub[1], ins, where)
    if name in _ELEMENTWISE:
      return [self.nonlinear(deps, _ELEMENTWISE[name], shape, where)]
    if name in ('max', 'min'):
      return [self.nonlinear(deps, 1.0, shape, where)]  # |max(a,b) - max(a',b')| <= max |.|
    if name == 'sort':
      if len(ins) != 1:
        raise _unsupported(eqn, 'a sort that carries other values along (not Lipschitz in them)')
      # Sorting is 1-Lipschitz in L2 (rearrangement inequality); rows are sorted separately.
      return [self.nonlinear(deps, 1.0, shape, where)]
    if name in ('reduce_max', 'reduce_min', 'argmax'):
      if name == 'argmax':
        raise _unsupported(eqn, 'an index is not a Lipschitz function of the input')
      return [self.nonlinear(deps, 1.0, shape, where)]  # disjoint windows
    if name == 'reduce_window_max' or name == 'reduce_window_min':
      p = eqn.params
      n = lipschitz.pool_overlap(deps[0].shape, p['window_dimensions'], p['window_strides'],
                                 p['padding'])  # fmt: skip
      return [self.nonlinear(deps, math.sqrt(n), shape, where)]
    step_for = _STEPS.get(name)
    if step_for is None:
      raise _unsupported(eqn, _HINTS.get(name, 'its Lipschitz constant is not known'))
    return [self.linear(eqn, ins, shape, step_for)]

  def linear(self, eqn, ins, shape, step_for) -> _Dep:
    dep_pos = [i for i, x in enumerate(ins) if isinstance(x, _Dep)]
    _refuse(eqn, ins, dep_pos)
    out = _Dep(shape, {})
    for i in dep_pos:
      if self.estimating:  # only the map is needed (its bound is estimated as a whole)
        zero = eqn.primitive.name in _ADDITIVE
        step = Step(shape, _applier(eqn, ins, i, zero), lambda: math.nan)
      else:
        step = step_for(eqn, ins, i, shape)
      for a, lin in ins[i].terms.items():
        new = _compose(step, lin)
        out.terms[a] = _sum(out.terms[a], new) if a in out.terms else new
    return out


# ----------------------------------------------------------------------------- linear steps


def _bind(eqn, ins) -> list:
  """The equation applied to values (as `jax.core.eval_jaxpr` does)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # older jax: (subfuns, params)
    subfuns, params = params
  out = eqn.primitive.bind(*subfuns, *ins, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _segment_key(i: int) -> str:
  return f'segment{i:03d}'


def _float_like(c, x):
  if isinstance(c, np.ndarray | jax.Array) and np.issubdtype(c.dtype, np.floating):
    return jnp.asarray(c, x.dtype)
  if isinstance(c, float):
    return jnp.asarray(c, x.dtype)
  return c


def _params_like(params, x):
  out = dict(params)
  for key in ('preferred_element_type', 'out_dtype', 'new_dtype'):
    if out.get(key) is not None and np.issubdtype(np.dtype(out[key]), np.floating):
      out[key] = x.dtype
  return out


def _applier(eqn, ins, i, zero_consts: bool):
  """x -> eqn applied with x in slot i; other operands as constants (zeroed when additive)."""
  prim = eqn.primitive

  def apply(x):
    ops = []
    for j, c in enumerate(ins):
      if j == i:
        ops.append(x)
      elif isinstance(c, _Dep) or (zero_consts and _is_float(c)):
        ops.append(jnp.zeros(np.shape(c) if not isinstance(c, _Dep) else c.shape, x.dtype))
      else:
        ops.append(_float_like(c, x))
    out = prim.bind(*ops, **_params_like(eqn.params, x))
    return out[0] if prim.multiple_results else out

  return apply


def _is_float(c) -> bool:
  return isinstance(c, float) or (hasattr(c, 'dtype') and np.issubdtype(c.dtype, np.floating))


def _generic(bound_fn):
  def make(eqn, ins, i, shape):
    return Step(shape, _applier(eqn, ins, i, False), lambda: bound_fn(eqn, ins, i, shape))

  return make


def _refuse(eqn, ins, dep_pos) -> None:
  """Linear primitives that are not linear in these operands."""
  name = eqn.primitive.name
  if len(dep_pos) > 1 and name not in _ADDITIVE:
    raise _unsupported(
      eqn,
      'a product of two input-dependent values (as in layer norm, or batch norm in training '
      'mode: use inference-mode batch norm, or normalise by constants)',
    )
  if name == 'select_n' and 0 in dep_pos:
    raise _unsupported(eqn, 'a selection by an input-dependent condition')
  if name == 'div' and 1 in dep_pos:
    raise _unsupported(eqn, 'a division by an input-dependent value')
  if name == 'conv_general_dilated' and 1 in dep_pos:
    raise _unsupported(eqn, 'the kernel of a convolution depends on the input')


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
  return Step(shape, _applier(eqn, ins, i, True), lambda: math.sqrt(copies),
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
  return Step(shape, _applier(eqn, ins, i, False), lambda: math.sqrt(copies) * mx, scale=scale)


def _neg(eqn, ins, i, shape):
  return Step(shape, _applier(eqn, ins, i, False), lambda: 1.0, transparent=True, negates=True)


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
    return max(_matrix_norm(k) for k in kernel)

  # A per-channel scale on the output's last axis folds into the kernel's columns when the
  # kernel's free dimension is that axis (a dense layer x @ W).
  info = {'contract_last': tuple(lc) == (len(ins[0].shape) - 1,) and not lb}
  kernel = ('dense', w, info, bound_fn) if i == 0 and nb == 1 and len(free) == 1 else None
  return Step(shape, _applier(eqn, ins, i, False), lambda: bound_fn(w), kernel=kernel)


def _conv(eqn, ins, i, shape):
  p = eqn.params
  lhs, rhs, _ = p['dimension_numbers']
  k = np.asarray(ins[1], np.float64)
  x_shape = ins[0].shape
  apply = _applier(eqn, ins, 0, False)
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
      lipschitz._conv_bound_np(
        kernel[..., j * cout : (j + 1) * cout], 1.0, in_hw=info['in_hw'],
        strides=info['strides'], pads=info['pads'], exact_max_dim=lipschitz.EXACT_MAX_DIM,
      )
      for j in range(g)
    )  # fmt: skip

  out_last = tuple(eqn.params['dimension_numbers'][2])[1] == len(shape) - 1
  kernel = ('conv', k, info, bound_fn) if out_last else None
  return Step(shape, apply, lambda: bound_fn(k), kernel=kernel)


def _no_bound(eqn):
  raise _unsupported(eqn, 'too large for the exact bound and no structured bound is known')


def _one(eqn, ins, i, shape):
  return 1.0


def _broadcast(eqn, ins, i, shape):
  return math.sqrt(math.prod(shape) / max(math.prod(ins[i].shape), 1))


def _reduce_sum(eqn, ins, i, shape):
  return math.sqrt(math.prod(ins[i].shape) / max(math.prod(shape), 1))


def _window_sum(eqn, ins, i, shape):
  p = eqn.params
  n = lipschitz.pool_overlap(ins[i].shape, p['window_dimensions'], p['window_strides'],
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


_ADDITIVE = ('add', 'sub', 'concatenate', 'select_n', 'pad', 'add_any')
_STEPS = {
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
  **{n: _generic(_one) for n in _SHAPE_ONLY if n != 'pad'},
}
_NORM = (
  ' (the variance of layer norm or of batch norm in training mode? use inference-mode batch'
  ' norm, or normalise by constants)'
)
_HINTS = {
  'exp': 'exp is not Lipschitz on the reals (a softmax? return logits, not probabilities)',
  'log': 'log is not Lipschitz',
  'integer_pow': 'a power is not Lipschitz on the reals' + _NORM,
  'square': 'a square is not Lipschitz on the reals' + _NORM,
  'rsqrt': 'a data-dependent normalisation (use inference-mode batch norm)',
  'sqrt': 'sqrt is not Lipschitz at 0',
  'gather': 'a gather (indexing)',
}


# ----------------------------------------------------------------------------- entry points


def certificate(
  apply_fn: Callable,
  variables: Any,
  input_shape: Sequence[int],
  *,
  exact_max_entries: int = EXACT_MAX_ENTRIES,
) -> Certificate:
  """Sound Lipschitz bounds of `apply_fn(variables, x) -> logits` over one example.

  Args:
    apply_fn: `(variables, images (B, *input_shape)) -> logits (B, K)`, any JAX function that
      treats examples independently (batch norm in inference mode), e.g. `model.apply` of a
      plain Flax model.
    variables: its parameters and state (concrete arrays).
    input_shape: one example's shape, e.g. (H, W, C).
    exact_max_entries: linear segments whose dense matrix has at most this many entries are
      bounded by its exact float64 norm; larger ones by the product of their steps' bounds.

  Returns:
    A `Certificate`: pairwise logit-difference bounds, the whole map's bound, the segments.

  Raises:
    UnsupportedOperation: an operation on the input's path has no known Lipschitz bound (the
      message names the primitive and the source line).
  """
  interp = _Interpreter(exact_max_entries)
  out = _logits(interp, apply_fn, variables, input_shape)
  if out is None:
    k = int(_out_classes(apply_fn, variables, input_shape))
    return Certificate(np.zeros((k, k), np.float32), 0.0, (), tuple(input_shape))
  k = out.shape[-1]
  pair = np.zeros((k, k))
  total = 0.0
  for a, lin in out.terms.items():
    r = matrix(lin, by_rows=True)  # (K, n_in), float64
    diff = np.sqrt(np.maximum(np.sum((r[:, None] - r[None]) ** 2, -1), 0.0))
    pair += diff * interp.lipschitz(a) * (1 + _RTOL)
    b = _matrix_norm(r) * (1 + _RTOL)
    total += b * interp.lipschitz(a)
    interp.segments.append(Segment('logits', lin.in_shape, lin.out_shape, b, True, lin))
  np.fill_diagonal(pair, 0.0)
  return Certificate(_round_up(pair), float(_round_up(np.float64(total))),
                     tuple(interp.segments), tuple(input_shape))  # fmt: skip


def _logits(interp: _Interpreter, apply_fn, variables, input_shape) -> '_Dep | None':
  """Interprets `apply_fn(variables, x)` for one example x; the logits' input-dependent value
  (None if they do not depend on the input). The variables enter the jaxpr as arguments, so in
  estimate mode the bounds are differentiable in them."""
  leaves, treedef = jax.tree.flatten(variables)
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  fn = lambda leaves, x: apply_fn(jax.tree.unflatten(treedef, leaves), x)  # noqa: E731
  closed = jax.make_jaxpr(fn)(leaves, x)
  if interp.estimating:
    consts, args = list(closed.consts), list(leaves)
  else:
    consts, args = [np.asarray(c) for c in closed.consts], [np.asarray(a) for a in leaves]
  (out,) = interp.run(closed.jaxpr, consts, [*args, interp.anchor((1, *input_shape), lambda: 1.0)])
  if not isinstance(out, _Dep):
    return None
  out = interp.resolve(out, 'logits')
  if math.prod(out.shape) != out.shape[-1]:
    raise ValueError(
      f'apply_fn must return logits of shape (1, K) for one example, got {out.shape}'
    )
  return out


def _out_classes(apply_fn, variables, input_shape) -> int:
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return jax.eval_shape(apply_fn, variables, x).shape[-1]


class Estimate(NamedTuple):
  """LMT's training estimate of the bounds in `Certificate` (one power-iteration step per
  segment: a lower bound on each segment's norm, differentiable in the parameters). Not a
  certificate: `certify` refuses it."""

  pairwise: jax.Array  # (K, K): estimate of the Lipschitz constant of z_i - z_j
  lipschitz: jax.Array  # (): estimate of the whole logit map's


def _estimate(apply_fn, variables, input_shape, iterates) -> tuple[Estimate, dict]:
  interp = _Interpreter(EXACT_MAX_ENTRIES, iterates)
  out = _logits(interp, apply_fn, variables, input_shape)
  if out is None:
    k = _out_classes(apply_fn, variables, input_shape)
    return Estimate(jnp.zeros((k, k)), jnp.zeros(())), {}
  k = out.shape[-1]
  pair, total = jnp.zeros((k, k)), jnp.zeros(())
  for a, lin in out.terms.items():
    # The last segment's rows (K of them, through its transpose): ||r_i - r_j|| and ||R||_2.
    _, vjp = jax.vjp(lin.apply, jnp.zeros(lin.in_shape, jnp.float32))
    rows = jax.vmap(vjp)(jnp.eye(k).reshape(k, *lin.out_shape))[0].reshape(k, -1)
    pair = pair + interp.lipschitz(a) * lipschitz.pairwise_row_norms(rows.T)
    gram = rows @ rows.T
    total = total + interp.lipschitz(a) * jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], 0))
  return Estimate(pair, total), interp.next_iterates


def init_iterates(
  apply_fn: Callable, variables: Any, input_shape: Sequence[int], key: jax.Array
) -> dict[str, jax.Array]:
  """The persistent power-iteration vectors of `estimate`, one per linear segment (keyed
  'segment000', ...; each shaped like the segment's input), drawn from `key`.

  Raises:
    UnsupportedOperation: as `certificate` would (checked here, before any training).
  """
  return _estimate(apply_fn, variables, tuple(input_shape), key)[1]


def estimate(
  apply_fn: Callable, variables: Any, iterates: dict[str, jax.Array], input_shape: Sequence[int]
) -> tuple[Estimate, dict[str, jax.Array]]:
  """LMT's training estimate of the logit bounds, on the same segments as `certificate`.

  One power-iteration step per linear segment, through `jax.vjp` of the segment itself, from
  the persistent iterates (`init_iterates`); the anchors' bounds and the pairwise head bounds
  are composed exactly as in `certificate`, with the last segment's rows taken exactly. Runs
  inside a jitted training step (the jaxpr is read at trace time).

  Returns:
    (Estimate, the next iterates): the estimate is differentiable in `variables`; the
    iterates are gradient-stopped.
  """
  return _estimate(apply_fn, variables, tuple(input_shape), iterates)


def converged(segment: Segment, key: jax.Array, steps: int = 500) -> float:
  """A converged power-iteration estimate of a segment's norm (a lower bound on it)."""
  u = jax.random.normal(key, segment.in_shape, jnp.float32)
  sigma, _ = jax.jit(lipschitz.power_iteration, static_argnums=(0, 2))(
    segment.linear.apply, u, steps
  )
  return float(sigma)


def _round_up(x: np.ndarray) -> np.ndarray:
  y = np.asarray(x, np.float32)
  return np.where(y < x, np.nextafter(y, np.float32(np.inf)), y)
