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
import jax.numpy as jnp
import numpy as np

from tsuzuku_jax.lmt import bounds
from tsuzuku_jax.lmt.interpreter import Interpreter
from tsuzuku_jax.lmt.operators import (
  Dep,
  Segment,
  UnsupportedOperation,
  exact_norm,
  matrix,
  matrix_norm,
)

__all__ = ['Certificate', 'Estimate', 'Segment', 'UnsupportedOperation', 'certificate',
           'converged', 'estimate', 'exact_norm', 'init_iterates']  # fmt: skip

# Dense matrices of linear segments up to this many entries are bounded exactly (float64 SVD).
EXACT_MAX_ENTRIES = 2**24


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
  interp = Interpreter(exact_max_entries)
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
    pair += diff * interp.lipschitz(a) * (1 + bounds.CERT_RTOL)
    b = matrix_norm(r) * (1 + bounds.CERT_RTOL)
    total += b * interp.lipschitz(a)
    interp.segments.append(Segment('logits', lin.in_shape, lin.out_shape, b, True, lin))
  np.fill_diagonal(pair, 0.0)
  return Certificate(bounds.round_up(pair), float(bounds.round_up(np.float64(total))),
                     tuple(interp.segments), tuple(input_shape))  # fmt: skip


def _logits(interp: Interpreter, apply_fn, variables, input_shape) -> 'Dep | None':
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
  if not isinstance(out, Dep):
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
  interp = Interpreter(EXACT_MAX_ENTRIES, iterates)
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
    pair = pair + interp.lipschitz(a) * bounds.pairwise_row_norms(rows.T)
    gram = rows @ rows.T
    total = total + interp.lipschitz(a) * jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], 0))
  return Estimate(pair, total), interp.next_iterates


def init_iterates(
  apply_fn: Callable, variables: Any, input_shape: Sequence[int], *, key: jax.Array
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


def converged(segment: Segment, *, key: jax.Array, steps: int = 500) -> float:
  """A converged power-iteration estimate of a segment's norm (a lower bound on it)."""
  u = jax.random.normal(key, segment.in_shape, jnp.float32)
  sigma, _ = jax.jit(bounds.power_iteration, static_argnums=(0, 2))(segment.linear.apply, u, steps)
  return float(sigma)
