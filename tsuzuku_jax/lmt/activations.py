"""Elementwise nonlinearities of the analysis: Lipschitz constants by primitive and by named
activation (jax.nn / flax), and activations recognised by their values when their body has no
bound of its own (an exact or tanh gelu, silu, mish)."""

import math
from collections.abc import Callable

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax.lmt.operators import Dep, UnsupportedOperation, float_like, params_like

# Elementwise nonlinearities by primitive, and named jitted activations (jax.nn / flax), with
# their Lipschitz constants: sup |f'| over the reals, rounded up.
ELEMENTWISE = {'abs': 1.0, 'tanh': 1.0, 'logistic': 0.25}
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
ELEMENTWISE_CALLS = frozenset((*_NAMED, 'leaky_relu', 'elu', 'celu', 'selu', 'logaddexp'))
CALLS = ('pjit', 'jit', 'closed_call', 'core_call', 'remat', 'checkpoint', 'custom_jvp_call',
          'custom_vjp_call', 'custom_vjp_call_jaxpr')  # fmt: skip
SHAPE_ONLY = ('reshape', 'transpose', 'squeeze', 'expand_dims', 'rev', 'copy', 'copy_p',
               'slice', 'pad', 'dynamic_slice', 'convert_element_type', 'stop_gradient',
               'optimization_barrier')  # fmt: skip


def sub_jaxpr(eqn):
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if key in eqn.params:
      j = eqn.params[key]
      return (j.jaxpr, j.consts) if hasattr(j, 'jaxpr') else (j, ())
  return None


def named_constant(eqn) -> float | None:
  """The Lipschitz constant of a named activation call (leaky relu and elu read their slope)."""
  name = eqn.params.get('name')
  if name in _NAMED:
    return _NAMED[name]
  if name in ('leaky_relu', 'elu', 'celu', 'selu'):
    sub = sub_jaxpr(eqn)
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


ELEMENTWISE_PRIMS = frozenset(
  ('mul', 'add', 'sub', 'div', 'neg', 'tanh', 'logistic', 'erf', 'erfc', 'exp', 'expm1',
   'log1p', 'log', 'integer_pow', 'pow', 'max', 'min', 'abs', 'copy', 'copy_p', 'sqrt', 'rsqrt',
   'square', 'sin', 'cos', 'sign')
)  # fmt: skip


def chain_fn(eqn, ins) -> Callable[[jax.Array], jax.Array]:
  """t -> the equation applied to the scalar functions of its input-dependent operands."""
  fns = [(x.ew[1] if x.ew else None, True) if isinstance(x, Dep) else (x, False) for x in ins]

  sub = sub_jaxpr(eqn) if eqn.primitive.name in CALLS else None

  def f(t):
    ops = []
    for fn_or_const, dep in fns:
      if dep:
        ops.append(t if fn_or_const is None else fn_or_const(t))
      else:
        ops.append(
          float_like(jnp.reshape(fn_or_const, ()) if np.ndim(fn_or_const) else fn_or_const, t)
        )
    if sub is not None:  # a named elementwise activation: its body on these operands
      return jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(sub[0], sub[1]))(*ops)[0]
    return eqn.primitive.bind(*ops, **params_like(eqn.params, t))

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
