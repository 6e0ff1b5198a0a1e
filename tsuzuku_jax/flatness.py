"""Hessian-vector products and Hessian estimators on parameter pytrees (Tsuzuku, Sato &
Sugiyama, ICML 2020: normalized flat minima).

Everything here works on a scalar loss `loss_fn(params)` (the data closed over) and on linear
operators `op(v)` over pytrees shaped like the parameters:

- `hvp`: H v by forward-over-reverse differentiation (`jax.jvp` of `jax.grad`); `hessian_op`
  linearizes the gradient once so that many probes reuse the primal computation.
- `normalized_op`: v -> theta * H(theta * v), the Hessian of u -> L(theta * (1 + u)) at u = 0.
  Its diagonal is theta_i^2 H_ii and its trace sum_i theta_i^2 H_ii = tr(D H D) with
  D = diag(|theta|): the per-parameter terms that do not change under the rescalings that leave
  a ReLU network's function unchanged.
- `hutchinson_trace` / `hutchinson_diagonal`: Rademacher-probe estimates (vmapped over a chunk
  of probes, chunks mapped), with standard errors.
- `lanczos` / `top_eigenvalues`: Lanczos with full re-orthogonalisation.
- `gauss_newton_diagonal`: the exact, non-negative Gauss-Newton diagonal for cross-entropy.
- `exact_hessian` / `exact_diagonal`: dense references for tiny models (tests).

On anything larger than a tiny model, build the operator inside a jit that takes the
parameters as an argument, e.g.
`jax.jit(lambda p: hutchinson_trace(normalized_op(loss_fn, p), p, key).value)(params)`:
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

from tsuzuku_jax import pac_bayes
from tsuzuku_jax.checks import check_images, check_labels_for, check_params

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


def normalized_op(loss_fn: LossFn, params: PyTree) -> Operator:
  """v -> theta * H (theta * v): diagonal theta_i^2 H_ii, trace tr(D H D), D = diag(|theta|).

  Estimating the per-parameter terms through this operator (rather than multiplying a raw
  estimate of H_ii by theta_i^2) keeps them exactly invariant under diagonal rescalings
  theta -> c * theta with H -> H / (c c^T): the operator itself is unchanged.
  """
  op = hessian_op(loss_fn, params)
  scale = lambda t: jax.tree.map(jnp.multiply, params, t)  # noqa: E731
  return lambda v: scale(op(scale(v)))


def _check_probes(num_probes: int, chunk: int) -> None:
  if num_probes < 1:
    raise ValueError(f'num_probes must be >= 1, got {num_probes}')
  if chunk < 1:
    raise ValueError(f'chunk must be >= 1, got {chunk}')


def per_leaf_random(draw, key: jax.Array, like: PyTree, lead: tuple[int, ...] = ()) -> PyTree:
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


def rademacher_probes(key: jax.Array, like: PyTree, num: int) -> PyTree:
  """`num` Rademacher (+-1) probes shaped like `like`, stacked on a leading axis."""
  return per_leaf_random(jax.random.rademacher, key, like, (num,))


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _probe_map(fn, key, like, num_probes, chunk):
  """fn over `num_probes` Rademacher probes: vmapped within a chunk, chunks mapped."""
  chunk = min(chunk, num_probes)
  n_chunks = -(-num_probes // chunk)
  keys = jax.random.split(key, n_chunks)
  out = jax.lax.map(lambda k: jax.vmap(fn)(rademacher_probes(k, like, chunk)), keys)
  return jax.tree.map(lambda a: a.reshape(n_chunks * chunk, *a.shape[2:])[:num_probes], out)


class Estimate(NamedTuple):
  value: Any  # the mean over probes (a scalar, or a pytree for diagonals)
  stderr: Any  # its standard error, same structure
  samples: Any  # per-probe values, leading axis = probes


def hutchinson_trace(
  op: Operator, like: PyTree, key: jax.Array, num_probes: int = 100, chunk: int = 16
) -> Estimate:
  """tr(op) ~ mean of v^T op(v) over Rademacher probes v (unbiased; for a symmetric A the
  variance of one sample is 2 (||A||_F^2 - sum_i A_ii^2))."""
  _check_probes(num_probes, chunk)
  s = _probe_map(lambda v: _vdot(v, op(v)), key, like, num_probes, chunk)
  se = jnp.std(s, ddof=1) / jnp.sqrt(num_probes) if num_probes > 1 else jnp.inf
  return Estimate(jnp.mean(s), se, s)


def hutchinson_diagonal(
  op: Operator, like: PyTree, key: jax.Array, num_probes: int = 100, chunk: int = 16
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


def lanczos(op: Operator, like: PyTree, key: jax.Array, num_iters: int) -> Lanczos:
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
  op: Operator, like: PyTree, key: jax.Array, k: int = 1, num_iters: int = 30
) -> jax.Array:
  """The k largest eigenvalues of a symmetric `op` (descending), from the Ritz values of
  `num_iters` Lanczos steps (exact once num_iters reaches the number of parameters; if
  Lanczos stops early on an invariant subspace, the unused steps add Ritz values of 0)."""
  n = ravel_pytree(like)[0].size
  num_iters = min(num_iters, n)
  if not 1 <= k <= num_iters:
    raise ValueError(f'need 1 <= k <= num_iters = {num_iters}, got k={k}')
  res = lanczos(op, like, key, num_iters)
  t = jnp.diag(res.alpha) + jnp.diag(res.beta, 1) + jnp.diag(res.beta, -1)
  return jnp.sort(jnp.linalg.eigvalsh(t))[::-1][:k]


def num_params(params: PyTree) -> int:
  return int(sum(np.prod(jnp.shape(x)) for x in jax.tree.leaves(params)))


# --- Measures -------------------------------------------------------------------------------


def normalized_diagonal(
  loss_fn: LossFn,
  params: PyTree,
  *,
  method: str = 'hutchinson',
  key: jax.Array | None = None,
  num_probes: int = 100,
  chunk: int = 16,
  logits_fn: Callable | None = None,
  images: jax.Array | None = None,
) -> PyTree:
  """kappa_i = theta_i^2 H_ii, the per-parameter terms of the normalized measures.

  method: 'hutchinson' (diagonal of `normalized_op`, unbiased, can be negative; with the same
  key it is exactly invariant to diagonal rescalings), 'exact' (n operator applications; tiny
  models), or 'gauss_newton' (theta^2 times the Gauss-Newton diagonal: >= 0, needs
  `logits_fn(params, images)` and `images`; the loss must be their mean cross-entropy).
  Raw Hutchinson estimates of H_ii multiplied by theta^2 would not be invariant, and clamping
  negative ones would break the invariance too: use one of these.
  """
  check_params(params)
  if method == 'hutchinson':
    if key is None:
      raise ValueError("method='hutchinson' needs a PRNG key")
    op = normalized_op(loss_fn, params)
    return hutchinson_diagonal(op, params, key, num_probes, chunk).value
  if method == 'exact':
    return exact_diagonal(normalized_op(loss_fn, params), params)
  if method == 'gauss_newton':
    if logits_fn is None or images is None:
      raise ValueError("method='gauss_newton' needs logits_fn and images")
    g = gauss_newton_diagonal(logits_fn, params, images)
    return jax.tree.map(lambda t, d: jnp.square(t) * d, params, g)
  raise ValueError(f"method must be 'hutchinson', 'exact' or 'gauss_newton', got {method!r}")


def sigma_optimised(kappa: PyTree, lam: float) -> jax.Array:
  """The sigma-optimised normalized measure (a reconstruction, see the README): the sum over
  parameters of min over sigma_i of 0.5 sigma_i^2 H_ii + lam * 0.5 ln(1 + theta_i^2 /
  sigma_i^2) (`pac_bayes.second_order_objective`), which depends on kappa_i = theta_i^2 H_ii
  only and so is invariant. kappa_i <= 0 (flat or concave directions) contributes 0.
  """
  k = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(kappa)])
  return pac_bayes.second_order_objective(k, lam)


def filter_scales(params: PyTree) -> PyTree:
  """Per-element scale s: for a weight of 2 or more dimensions (Dense (in, out), Conv
  (kh, kw, in, out)), the L2 norm of its output filter (all axes but the last) broadcast over
  the filter; for a 1-D leaf (bias, batch-norm scale) its absolute values."""

  def scale(t):
    if jnp.ndim(t) >= 2:
      axes = tuple(range(jnp.ndim(t) - 1))
      return jnp.broadcast_to(jnp.sqrt(jnp.sum(jnp.square(t), axes, keepdims=True)), t.shape)
    return jnp.abs(t)

  return jax.tree.map(scale, params)


def filter_normalized_op(loss_fn: LossFn, params: PyTree) -> Operator:
  """v -> s * H (s * v) with s = `filter_scales(params)`: its trace is the filter-wise
  normalized measure sum_f ||w_f||^2 tr(H_ff) (plus sum_i theta_i^2 H_ii over 1-D leaves).

  Scaling a filter w_f -> c w_f (invisible behind a batch norm) scales s by c and H_ff by
  1 / c^2, so the operator, and any estimate with the same probes, is unchanged.
  """
  op = hessian_op(loss_fn, params)
  s = filter_scales(params)
  scale = lambda t: jax.tree.map(jnp.multiply, s, t)  # noqa: E731
  return lambda v: scale(op(scale(v)))


def matrix_norm_products(weights: list[jax.Array]) -> dict:
  """The matrix-norm baselines: products over layers of the spectral and of the Frobenius
  norms of each weight, reshaped to (fan_in, out) (a conv kernel's spectral norm here is
  that of its reshaped matrix, not of the convolution). They are invariant to layer-wise
  rescaling (alpha W_1, W_2 / alpha) but not to neuron-wise rescaling."""
  spectral, frobenius = 1.0, 1.0
  for w in weights:
    m = jnp.reshape(w, (-1, jnp.shape(w)[-1]))
    spectral *= float(jnp.linalg.norm(m, 2))
    frobenius *= float(jnp.linalg.norm(m))
  return {'spectral_product': spectral, 'frobenius_product': frobenius}


def path_norm(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, shape) -> float:
  """The (squared) path-norm of a ReLU network: the summed outputs of the network with every
  parameter squared on an all-ones input of `shape` (one example), as in Jiang et al."""
  squared = jax.tree.map(jnp.square, params)
  return float(jnp.sum(apply_fn(squared, jnp.ones((1, *shape)))))


def rescale_neurons(
  params: PyTree,
  layers: list[str],
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


def sharpness_sigma(
  error_fn: Callable[[PyTree], jax.Array],
  params: PyTree,
  key: jax.Array,
  *,
  target: float = 0.1,
  magnitude: bool = True,
  num_samples: int = 16,
  iters: int = 20,
  lo: float = 1e-5,
  hi: float = 10.0,
) -> jax.Array:
  """The largest noise scale sigma at which the mean of error_fn(theta + noise) over
  `num_samples` fixed Gaussian draws exceeds error_fn(theta) by at most `target`, by bisection
  on log sigma in [lo, hi] (Jiang et al.'s PAC-Bayes sharpness; the measure is 1 / sigma^2).

  magnitude=False: noise sigma * z (the classic, scale-dependent form). magnitude=True: noise
  sigma * |theta| * z, which moves every parameter in proportion to its size; a diagonal
  rescaling of theta rescales the perturbed networks the same way, so sigma is invariant
  (exactly so with the same key, up to float rounding of the outputs).
  """
  if num_samples < 1 or iters < 1:
    raise ValueError(f'num_samples and iters must be >= 1, got {num_samples}, {iters}')
  if not 0 < lo < hi:
    raise ValueError(f'need 0 < lo < hi, got lo={lo}, hi={hi}')
  base = error_fn(params)
  z = per_leaf_random(jax.random.normal, key, params, (num_samples,))
  scale = jax.tree.map(jnp.abs, params) if magnitude else jax.tree.map(jnp.ones_like, params)

  def excess(log_s):
    def one(zi):
      return error_fn(jax.tree.map(lambda p, s, e: p + jnp.exp(log_s) * s * e, params, scale, zi))

    return jnp.mean(jax.lax.map(one, z)) - base

  def step(_, bracket):
    a, b = bracket
    mid = 0.5 * (a + b)
    over = excess(mid) > target
    return jnp.where(over, a, mid), jnp.where(over, mid, b)

  a, _ = jax.lax.fori_loop(0, iters, step, (jnp.log(lo), jnp.log(hi)))
  return jnp.exp(a)


def _cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))


def measure_fn(
  apply_fn: Callable[[PyTree, jax.Array], jax.Array],
  *,
  num_probes: int = 64,
  chunk: int = 16,
  lanczos_iters: int = 20,
  lam: float = 1e-3,
  sharpness_target: float = 0.1,
  sharpness_samples: int = 16,
  sharpness_iters: int = 20,
  gn_chunk: int = 64,
) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array], dict]:
  """`fn(params, images, labels, key) -> {name: scalar}`: every measure of a ReLU classifier
  at `params` on (images, labels) with the mean cross-entropy loss, in one jit (non-finite
  parameters, images and out-of-range labels are refused by name first).

  Build it once per architecture: the parameters are a jit argument (see the module docstring),
  so models of the same shapes share one compilation. Scale-dependent ('raw') measures:
  hessian_trace, top_eigenvalue (Lanczos), gauss_newton_trace, pac_bayes_sharpness (1/sigma^2,
  isotropic noise), param_norm (sum theta^2), spectral_product, frobenius_product. Invariant
  to every diagonal function-preserving rescaling: normalized_trace tr(D H D) (Hutchinson on
  `normalized_op`), normalized_trace_gn (sum theta_i^2 G_ii), sigma_optimised (at `lam`),
  normalized_sqrt (sum |theta_i| sqrt(G_ii), its ln(1+x) <= x closed form),
  pac_bayes_mag_flatness (1/sigma^2, magnitude-aware noise) and path_norm. Invariant to filter
  scaling only: filter_normalized_trace. `*_stderr` entries are Hutchinson standard errors.
  For a network that is not a plain ReLU chain, path_norm is left out, and for a conv network
  spectral_product is reported as reshaped_spectral_product (`inapplicable_measures` says why).
  """

  def fn(params, images, labels, key):
    loss_fn = lambda p: _cross_entropy(apply_fn(p, images), labels)  # noqa: E731
    error_fn = lambda p: jnp.mean(jnp.argmax(apply_fn(p, images), -1) != labels)  # noqa: E731
    keys = jax.random.split(key, 6)
    h = hessian_op(loss_fn, params)
    tr = hutchinson_trace(h, params, keys[0], num_probes, chunk)
    ntr = hutchinson_trace(normalized_op(loss_fn, params), params, keys[1], num_probes, chunk)
    ftr = hutchinson_trace(
      filter_normalized_op(loss_fn, params), params, keys[2], num_probes, chunk
    )
    gn = jnp.concatenate(
      [
        jnp.ravel(x)
        for x in jax.tree.leaves(gauss_newton_diagonal(apply_fn, params, images, gn_chunk))
      ]
    )
    theta = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(params)])
    kappa = jnp.square(theta) * gn
    sharp = dict(target=sharpness_target, num_samples=sharpness_samples, iters=sharpness_iters)
    sigma_raw = sharpness_sigma(error_fn, params, keys[4], magnitude=False, **sharp)
    sigma_mag = sharpness_sigma(error_fn, params, keys[5], magnitude=True, **sharp)
    weights = [w.reshape(-1, w.shape[-1]) for w in jax.tree.leaves(params) if w.ndim >= 2]
    squared = jax.tree.map(jnp.square, params)
    return {
      'hessian_trace': tr.value,
      'hessian_trace_stderr': tr.stderr,
      'top_eigenvalue': top_eigenvalues(h, params, keys[3], 1, lanczos_iters)[0],
      'gauss_newton_trace': jnp.sum(gn),
      'pac_bayes_sharpness': 1.0 / jnp.square(sigma_raw),
      'param_norm': jnp.sum(jnp.square(theta)),
      'spectral_product': jnp.prod(jnp.stack([jnp.linalg.norm(w, 2) for w in weights])),
      'frobenius_product': jnp.prod(jnp.stack([jnp.linalg.norm(w) for w in weights])),
      'normalized_trace': ntr.value,
      'normalized_trace_stderr': ntr.stderr,
      'normalized_trace_gn': jnp.sum(kappa),
      'sigma_optimised': pac_bayes.second_order_objective(kappa, lam),
      'normalized_sqrt': jnp.sum(jnp.sqrt(kappa)),
      'pac_bayes_mag_flatness': 1.0 / jnp.square(sigma_mag),
      'path_norm': jnp.sum(apply_fn(squared, jnp.ones((1, *images.shape[1:]), images.dtype))),
      'filter_normalized_trace': ftr.value,
      'filter_normalized_trace_stderr': ftr.stderr,
    }

  _check_probes(num_probes, chunk)
  jitted = jax.jit(fn)
  caveats: list[dict] = []  # inapplicable_measures, found at the first call

  def checked(params, images, labels, key):
    # On the host, before the jit: a nan would only give nan measures.
    check_params(params)
    check_images(images, pixel_range=None, ndim=None)
    check_labels_for(lambda x: apply_fn(params, x), images, labels)
    if not caveats:
      caveats.append(inapplicable_measures(apply_fn, params, images.shape[1:]))
    out = jitted(params, images, labels, key)
    if 'path_norm' in caveats[0]:
      del out['path_norm']
    if 'spectral_product' in caveats[0]:
      out['reshaped_spectral_product'] = out.pop('spectral_product')
    return out

  return checked


# Primitives of a plain ReLU network (linear maps, biases, relu, reshapes, calls): the
# squared-parameter network's output is then its path norm.
_PATH_NORM_PRIMITIVES = frozenset(
  ('dot_general', 'conv_general_dilated', 'add', 'add_any', 'max', 'reshape', 'broadcast_in_dim',
   'squeeze', 'expand_dims', 'transpose', 'convert_element_type', 'copy', 'copy_p', 'pjit', 'jit',
   'closed_call', 'custom_jvp_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr', 'stop_gradient')
)  # fmt: skip


def _primitives(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for v in eqn.params.values():
      sub = getattr(v, 'jaxpr', v)
      if hasattr(sub, 'eqns'):
        names |= _primitives(sub)
  return names


def inapplicable_measures(
  apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, input_shape
) -> dict[str, str]:
  """{measure: why} for the measures of `measure_fn` that do not mean what their name says for
  this network, read from its parameters and its jaxpr:

  - 'path_norm' (refused: left out of `measure_fn`'s results): the squared-parameter network
    computes the path norm only for a chain of linear maps, biases and ReLUs; batch norm, input
    normalisation, max or average pooling and other operations break that.
  - 'spectral_product' (labelled: reported as 'reshaped_spectral_product'): a conv kernel's
    norm here is that of its reshaped (kh kw cin, cout) matrix, not the convolution's operator
    norm (`lmt.certificate` gives a sound bound of the network's).
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  other = _primitives(jax.make_jaxpr(apply_fn)(params, x).jaxpr) - _PATH_NORM_PRIMITIVES
  out = {}
  if other:
    out['path_norm'] = f'not a plain ReLU network (it uses {", ".join(sorted(other))})'
  if any(jnp.ndim(w) > 2 for w in jax.tree.leaves(params)):
    out['spectral_product'] = "conv kernels' reshaped matrices, not the convolutions' norms"
  return out


RAW_MEASURES = (
  'hessian_trace',
  'top_eigenvalue',
  'gauss_newton_trace',
  'pac_bayes_sharpness',
  'param_norm',
  'spectral_product',
  'frobenius_product',
)
NORMALIZED_MEASURES = (
  'normalized_trace',
  'normalized_trace_gn',
  'sigma_optimised',
  'normalized_sqrt',
  'pac_bayes_mag_flatness',
  'path_norm',
)
FILTER_MEASURES = ('filter_normalized_trace',)
