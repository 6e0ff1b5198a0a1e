"""The jaxpr interpreter of the Lipschitz analysis (see `analysis` for what it computes): it
walks the equations, keeps input-dependent values as sums of linear maps from anchors, closes a
segment at each nonlinearity, and bounds it (certificate mode) or takes one power-iteration
step on it (estimate mode)."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax.lmt import bounds
from tsuzuku_jax.lmt.activations import (
  CALLS,
  ELEMENTWISE,
  ELEMENTWISE_CALLS,
  ELEMENTWISE_PRIMS,
  chain_fn,
  named_constant,
  recognise,
  sub_jaxpr,
)
from tsuzuku_jax.lmt.operators import (
  Dep,
  Linear,
  Segment,
  Step,
  UnsupportedOperation,
  add_maps,
  compose,
  exact_norm,
  identity,
  source_line,
  unsupported,
)
from tsuzuku_jax.lmt.steps import ADDITIVE, HINTS, STEPS, applier, refuse
from tsuzuku_jax.models import minmax_p


class Interpreter:
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
      return exact_norm(lin) * (1 + bounds.CERT_RTOL), True
    return lin.bound() * (1 + bounds.CERT_RTOL), False

  def estimate(self, lin: Linear) -> jax.Array:
    """One power-iteration step on the segment from its persistent iterate."""
    key = segment_key(len(self.segments))
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
    sigma, self.next_iterates[key] = bounds.power_iteration_step(lin.apply, u)
    return sigma

  def lipschitz(self, a: int) -> Any:
    if a not in self.anchor_cache:
      v = self.anchor_fns[a]()
      self.anchor_cache[a] = v if self.estimating else float(v)
    return self.anchor_cache[a]

  def close(self, dep: Dep, where: str) -> float:
    """The sound Lipschitz bound of `dep` w.r.t. the input (recording its segments)."""
    total = 0.0
    for a, lin in dep.terms.items():
      b, exact = self.bound(lin)
      self.segments.append(Segment(where, lin.in_shape, lin.out_shape, b, exact, lin))
      total += b * self.lipschitz(a)
    return total * (1 + 1e-12)

  def anchor(self, shape, bound_fn: Callable[[], float]) -> Dep:
    self.anchor_fns.append(bound_fn)
    return Dep(tuple(shape), {len(self.anchor_fns) - 1: identity(shape)})

  def nonlinear(self, deps: Sequence[Dep], factor: float, shape, where: str) -> Dep:
    """An anchor for f(deps): L <= factor * sqrt(sum L(dep)^2) (one dep: factor * L(dep))."""
    deps = [self.resolve(d, where) for d in deps]

    def bound_fn():
      ls = [self.close(d, where) for d in deps]
      if len(ls) == 1:
        return factor * ls[0] * (1 + 1e-12)
      sqrt = jnp.sqrt if self.estimating else math.sqrt
      return factor * sqrt(sum(v * v for v in ls)) * (1 + 1e-12)

    return self.anchor(shape, bound_fn)

  def resolve(self, dep: Dep, where: str) -> Dep:
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
      if not any(isinstance(x, Dep) for x in ins):
        outs = bind(eqn, ins)
        if not self.estimating:  # concrete values, for the bounds' float64 arithmetic
          outs = [np.asarray(o) if hasattr(o, 'dtype') else o for o in outs]
      else:
        where = source_line(eqn, outer)
        try:
          outs = self.elementwise(eqn, ins, where)
          if outs is None:
            ins = [self.resolve(x, where) if isinstance(x, Dep) else x for x in ins]
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
    named = eqn.primitive.name in CALLS and eqn.params.get('name') in ELEMENTWISE_CALLS
    if not (eqn.primitive.name in ELEMENTWISE_PRIMS or named) or len(eqn.outvars) != 1:
      return None
    shape = tuple(eqn.outvars[0].aval.shape)
    sources = {}
    for x in ins:
      if isinstance(x, Dep):
        if x.shape != shape:
          return None
        src = x.ew[0] if x.ew else x
        sources[id(src)] = src
      elif np.size(x) != 1:
        return None  # a per-element constant: not one scalar function
    if len(sources) != 1:
      return None
    ew = (next(iter(sources.values())), chain_fn(eqn, ins))
    why = next((x.ew[2] for x in ins if isinstance(x, Dep) and x.terms is None), None)
    if why is None:
      try:
        out = self.eqn(eqn, ins, where)
        out[0].ew = ew
        return out
      except UnsupportedOperation as e:
        why = f'{eqn.primitive.name} on an input-dependent value at {where}: {e.args[0]}'
    return [Dep(shape, None, (*ew, why))]

  def eqn(self, eqn, ins, where: str) -> list:
    name = eqn.primitive.name
    shape = tuple(eqn.outvars[0].aval.shape)
    deps = [x for x in ins if isinstance(x, Dep)]
    if name in CALLS:
      factor = named_constant(eqn)
      if factor is not None and len(deps) == 1 and len(eqn.outvars) == 1:
        return [self.nonlinear(deps, factor, shape, where)]
      sub = sub_jaxpr(eqn)
      if sub is None:
        raise unsupported(eqn, 'a call whose body is not a jaxpr')
      return self.run(sub[0], sub[1], ins, where)
    if name in ELEMENTWISE:
      return [self.nonlinear(deps, ELEMENTWISE[name], shape, where)]
    if name in ('max', 'min'):
      return [self.nonlinear(deps, 1.0, shape, where)]  # |max(a,b) - max(a',b')| <= max |.|
    if name == 'sort':
      if len(ins) != 1:
        raise unsupported(eqn, 'a sort that carries other values along (not Lipschitz in them)')
      # Sorting is 1-Lipschitz in L2 (rearrangement inequality); rows are sorted separately.
      return [self.nonlinear(deps, 1.0, shape, where)]
    if eqn.primitive is minmax_p:  # models.minmax: a sort of each channel pair (max/min inside)
      return [self.nonlinear(deps, 1.0, shape, where)]
    if name in ('reduce_max', 'reduce_min', 'argmax'):
      if name == 'argmax':
        raise unsupported(eqn, 'an index is not a Lipschitz function of the input')
      return [self.nonlinear(deps, 1.0, shape, where)]  # disjoint windows
    if name == 'reduce_window_max' or name == 'reduce_window_min':
      p = eqn.params
      n = bounds.pool_overlap(deps[0].shape, p['window_dimensions'], p['window_strides'],
                                 p['padding'])  # fmt: skip
      return [self.nonlinear(deps, math.sqrt(n), shape, where)]
    step_for = STEPS.get(name)
    if step_for is None:
      raise unsupported(eqn, HINTS.get(name, 'its Lipschitz constant is not known'))
    return [self.linear(eqn, ins, shape, step_for)]

  def linear(self, eqn, ins, shape, step_for) -> Dep:
    dep_pos = [i for i, x in enumerate(ins) if isinstance(x, Dep)]
    refuse(eqn, ins, dep_pos)
    out = Dep(shape, {})
    for i in dep_pos:
      if self.estimating:  # only the map is needed (its bound is estimated as a whole)
        zero = eqn.primitive.name in ADDITIVE
        step = Step(shape, applier(eqn, ins, i, zero), lambda: math.nan)
      else:
        step = step_for(eqn, ins, i, shape)
      for a, lin in ins[i].terms.items():
        new = compose(step, lin)
        out.terms[a] = add_maps(out.terms[a], new) if a in out.terms else new
    return out


def bind(eqn, ins) -> list:
  """The equation applied to values (as `jax.core.eval_jaxpr` does)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # older jax: (subfuns, params)
    subfuns, params = params
  out = eqn.primitive.bind(*subfuns, *ins, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def segment_key(i: int) -> str:
  return f'segment{i:03d}'


# ----------------------------------------------------------------------------- entry points
