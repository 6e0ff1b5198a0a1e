"""Hessian-vector products and Hessian estimators on parameter pytrees (paper-free: the
measures of normalized flat minima that use them are in `tsuzuku_jax.flatness.measures`).

Everything here works on a scalar loss `loss_fn(params)` (the data closed over) and on linear
operators `op(v)` over pytrees shaped like the parameters:

- `hvp`: H v by forward-over-reverse differentiation (`jax.jvp` of `jax.grad`); `hessian_op`
  linearizes the gradient once so that many probes reuse the primal computation.
- `hutchinson_trace` / `hutchinson_diagonal`: Rademacher-probe estimates (vmapped over a chunk
  of probes, chunks mapped), with standard errors.
- `lanczos` / `top_eigenvalues`: Lanczos with full re-orthogonalisation.
- `gauss_newton_diagonal`: the exact, non-negative Gauss-Newton diagonal for cross-entropy.
- `exact_hessian` / `exact_diagonal`: dense references for tiny models (tests).

On anything larger than a tiny model, build the operator inside a jit that takes the
parameters as an argument, e.g.
`jax.jit(lambda p: hutchinson_trace(hessian_op(loss_fn, p), p, key).value)(params)`:
parameters closed over as constants let XLA constant-fold through the network (a CNN's
max-pool under vmap then takes minutes to compile).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]  # params -> scalar loss
Operator = Callable[[PyTree], PyTree]  # a symmetric linear map on parameter-shaped pytrees


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
  """H v at `params`, forward over reverse: one jvp of the gradient."""
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def hessian_op(loss_fn: LossFn, params: PyTree) -> Operator:
  """v -> H v with the gradient linearized once (`jax.linearize`): cheaper for many probes."""
  _, lin = jax.linearize(jax.grad(loss_fn), params)
  return lin


def _check_probes(num_probes: int, chunk: int) -> None:
  if num_probes < 1:
    raise ValueError(f'num_probes must be >= 1, got {num_probes}')
  if chunk < 1:
    raise ValueError(f'chunk must be >= 1, got {chunk}')


def per_leaf_random(draw, like: PyTree, lead: tuple[int, ...] = (), *, key: jax.Array) -> PyTree:
  """`draw(k, shape, dtype)` for every leaf of `like` (shape `(*lead, *leaf.shape)`), leaf i
  with key `split(key, n)[i]`.

  Each draw is made flat and reshaped: the same values (threefry numbers elements by their
  flat index), but XLA:CPU compiles a draw of a 4-D conv kernel's shape about 7x slower than a
  flat one, and a ResNet has dozens of such leaves (measure_fn on a small batch-norm ResNet
  compiled for minutes).
  """
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, x in zip(keys, leaves, strict=True):
    shape = (*lead, *jnp.shape(x))
    out.append(draw(k, (math.prod(shape),), jnp.result_type(x)).reshape(shape))
  return jax.tree.unflatten(treedef, out)


def rademacher_probes(like: PyTree, num: int, *, key: jax.Array) -> PyTree:
  """`num` Rademacher (+-1) probes shaped like `like`, stacked on a leading axis."""
  return per_leaf_random(jax.random.rademacher, like, (num,), key=key)


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _probe_map(fn, key, like, num_probes, chunk):
  """fn over `num_probes` Rademacher probes: vmapped within a chunk, chunks mapped."""
  chunk = min(chunk, num_probes)
  n_chunks = -(-num_probes // chunk)
  keys = jax.random.split(key, n_chunks)
  out = jax.lax.map(lambda k: jax.vmap(fn)(rademacher_probes(like, chunk, key=k)), keys)
  return jax.tree.map(lambda a: a.reshape(n_chunks * chunk, *a.shape[2:])[:num_probes], out)


class Estimate(NamedTuple):
  value: Any  # the mean over probes (a scalar, or a pytree for diagonals)
  stderr: Any  # its standard error, same structure
  samples: Any  # per-probe values, leading axis = probes


def hutchinson_trace(
  op: Operator, like: PyTree, *, key: jax.Array, num_probes: int = 100, chunk: int = 16
) -> Estimate:
  """tr(op) ~ mean of v^T op(v) over Rademacher probes v (unbiased; for a symmetric A the
  variance of one sample is 2 (||A||_F^2 - sum_i A_ii^2))."""
  _check_probes(num_probes, chunk)
  s = _probe_map(lambda v: _vdot(v, op(v)), key, like, num_probes, chunk)
  se = jnp.std(s, ddof=1) / jnp.sqrt(num_probes) if num_probes > 1 else jnp.inf
  return Estimate(jnp.mean(s), se, s)


def hutchinson_diagonal(
  op: Operator, like: PyTree, *, key: jax.Array, num_probes: int = 100, chunk: int = 16
) -> Estimate:
  """diag(op) ~ mean of v * op(v) over Rademacher probes (unbiased; the variance of entry i
  of one sample is sum_{j != i} A_ij^2), as pytrees shaped like `like`."""
  _check_probes(num_probes, chunk)
  s = _probe_map(lambda v: jax.tree.map(jnp.multiply, v, op(v)), key, like, num_probes, chunk)
  mean = jax.tree.map(lambda a: jnp.mean(a, 0), s)
  if num_probes > 1:
    se = jax.tree.map(lambda a: jnp.std(a, 0, ddof=1) / jnp.sqrt(num_probes), s)
  else:
    se = jax.tree.map(lambda a: jnp.full(a.shape[1:], jnp.inf, a.dtype), s)
  return Estimate(mean, se, s)


def exact_hessian(loss_fn: LossFn, params: PyTree) -> jax.Array:
  """The dense (n, n) Hessian over the raveled parameters (tiny models only)."""
  flat, unravel = ravel_pytree(params)
  return jax.hessian(lambda f: loss_fn(unravel(f)))(flat)


def exact_diagonal(op: Operator, like: PyTree, chunk: int = 64) -> PyTree:
  """diag(op) exactly, from op applied to every basis vector (n applications; tiny models)."""
  flat, unravel = ravel_pytree(like)
  n = flat.size
  chunk = min(chunk, n)
  n_chunks = -(-n // chunk)

  def column(i):  # i >= n (padding) gives a zero vector; its value is dropped below
    e = jax.nn.one_hot(i, n, dtype=flat.dtype)
    return ravel_pytree(op(unravel(e)))[0][jnp.minimum(i, n - 1)]

  idx = jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)
  diag = jax.lax.map(jax.vmap(column), idx).reshape(-1)[:n]
  return unravel(diag)


def gauss_newton_diagonal(
  logits_fn: Callable[[PyTree, jax.Array], jax.Array],
  params: PyTree,
  images: jax.Array,
  chunk: int = 32,
) -> PyTree:
  """Exact diagonal of the generalised Gauss-Newton matrix of the mean softmax cross-entropy,
  G = (1/B) sum_b J_b^T (diag p_b - p_b p_b^T) J_b, J_b the Jacobian of example b's logits.

  G is positive semi-definite, so its diagonal is >= 0 (unlike Hutchinson estimates of H_ii);
  it does not depend on the labels. With diag p - p p^T = A A^T, a_c = sqrt(p_c) (e_c - p),
  diag G = (1/B) sum_b sum_c (J_b^T a_bc)^2: K vector-Jacobian products per example, vmapped
  over classes and over `chunk` examples at a time.

  Args:
    logits_fn: (params, images (B, ...)) -> logits (B, K), examples independent.
    params: the parameter pytree.
    images: (B, ...) inputs.
    chunk: examples per vmapped chunk.
  """
  if chunk < 1:
    raise ValueError(f'chunk must be >= 1, got {chunk}')
  b = images.shape[0]
  chunk = min(chunk, b)
  n_chunks = -(-b // chunk)
  pad = n_chunks * chunk - b
  xs = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
  valid = (jnp.arange(n_chunks * chunk) < b).reshape(n_chunks, chunk)

  def one(x, ok):
    logits, vjp = jax.vjp(lambda p: logits_fn(p, x[None])[0], params)
    prob = jax.nn.softmax(logits)
    k = prob.shape[0]
    a = jnp.sqrt(prob)[:, None] * (jnp.eye(k, dtype=prob.dtype) - prob[None, :])  # rows a_c
    cols = jax.vmap(lambda v: vjp(v)[0])(a)
    return jax.tree.map(lambda c: ok * jnp.sum(jnp.square(c), 0), cols)

  def one_chunk(args):
    x, ok = args
    return jax.tree.map(lambda t: jnp.sum(t, 0), jax.vmap(one)(x, ok))

  parts = jax.lax.map(one_chunk, (xs.reshape(n_chunks, chunk, *images.shape[1:]), valid))
  return jax.tree.map(lambda t: jnp.sum(t, 0) / b, parts)


class Lanczos(NamedTuple):
  alpha: jax.Array  # (m,) diagonal of the tridiagonal matrix
  beta: jax.Array  # (m - 1,) off-diagonal
  basis: jax.Array  # (m, n) orthonormal Lanczos vectors (raveled)


def lanczos(op: Operator, like: PyTree, *, key: jax.Array, num_iters: int) -> Lanczos:
  """`num_iters` Lanczos steps from a random unit start, with full re-orthogonalisation
  (every new vector is orthogonalised against all previous ones, twice), so the Ritz values
  stay accurate without ghost copies. Stops early (zero-padding) on an invariant subspace."""
  flat, unravel = ravel_pytree(like)
  n = flat.size
  if not 1 <= num_iters <= n:
    raise ValueError(f'num_iters must be in [1, {n}] (the number of parameters), got {num_iters}')
  matvec = lambda x: ravel_pytree(op(unravel(x)))[0]  # noqa: E731
  q0 = jax.random.normal(key, (n,), flat.dtype)
  q0 = q0 / jnp.linalg.norm(q0)
  tiny = jnp.finfo(flat.dtype).eps * 10

  def step(carry, j):
    basis, alpha, beta, q, beta_prev, q_prev, live = carry
    w = matvec(q) - beta_prev * q_prev
    a = jnp.vdot(q, w)
    w = w - a * q
    mask = (jnp.arange(num_iters) <= j)[:, None]
    for _ in range(2):  # full re-orthogonalisation against q_0..q_j
      w = w - ((basis * mask).T @ ((basis * mask) @ w))
    b = jnp.linalg.norm(w)
    live_next = live & (b > tiny * jnp.maximum(jnp.abs(a), 1.0))
    q_next = jnp.where(live_next, w / jnp.where(b > 0, b, 1.0), 0.0)
    alpha = alpha.at[j].set(jnp.where(live, a, 0.0))
    beta = beta.at[j].set(jnp.where(live_next, b, 0.0))
    basis = basis.at[j + 1].set(q_next, mode='drop')
    return (basis, alpha, beta, q_next, jnp.where(live_next, b, 0.0), q, live_next), None

  basis = jnp.zeros((num_iters, n), flat.dtype).at[0].set(q0)
  zeros = jnp.zeros(num_iters, flat.dtype)
  init = (basis, zeros, zeros, q0, jnp.zeros((), flat.dtype), jnp.zeros_like(q0), True)
  (basis, alpha, beta, *_), _ = jax.lax.scan(step, init, jnp.arange(num_iters))
  return Lanczos(alpha, beta[: num_iters - 1], basis)


def top_eigenvalues(
  op: Operator, like: PyTree, *, key: jax.Array, k: int = 1, num_iters: int = 30
) -> jax.Array:
  """The k largest eigenvalues of a symmetric `op` (descending), from the Ritz values of
  `num_iters` Lanczos steps (exact once num_iters reaches the number of parameters; if
  Lanczos stops early on an invariant subspace, the unused steps add Ritz values of 0)."""
  n = ravel_pytree(like)[0].size
  num_iters = min(num_iters, n)
  if not 1 <= k <= num_iters:
    raise ValueError(f'need 1 <= k <= num_iters = {num_iters}, got k={k}')
  res = lanczos(op, like, key=key, num_iters=num_iters)
  t = jnp.diag(res.alpha) + jnp.diag(res.beta, 1) + jnp.diag(res.beta, -1)
  return jnp.sort(jnp.linalg.eigvalsh(t))[::-1][:k]


def num_params(params: PyTree) -> int:
  return int(sum(np.prod(jnp.shape(x)) for x in jax.tree.leaves(params)))
