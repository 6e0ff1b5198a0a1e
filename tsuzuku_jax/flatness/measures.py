"""The measures of normalized flat minima (Tsuzuku, Sato & Sugiyama, ICML 2020) and the
baselines they are compared with, on a ReLU classifier's parameter pytree.

`normalized_op` is v -> theta * H(theta * v), the Hessian of u -> L(theta * (1 + u)) at u = 0.
Its diagonal is theta_i^2 H_ii and its trace sum_i theta_i^2 H_ii = tr(D H D) with
D = diag(|theta|): the per-parameter terms that do not change under the rescalings that leave a
ReLU network's function unchanged (`flatness.rescaling.rescale_neurons` draws one).
`measure_fn` computes every measure, raw and normalized, in one jit; `inapplicable_measures`
says which do not mean what their name says for a given network. The curvature tools are in
`flatness.hessian`.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tsuzuku_jax.checks import check_images, check_labels_for, check_params
from tsuzuku_jax.flatness import pac_bayes
from tsuzuku_jax.flatness.hessian import (
  LossFn,
  Operator,
  PyTree,
  _check_probes,
  exact_diagonal,
  gauss_newton_diagonal,
  hessian_op,
  hutchinson_diagonal,
  hutchinson_trace,
  per_leaf_random,
  top_eigenvalues,
)
from tsuzuku_jax.train_lib import cross_entropy


def normalized_op(loss_fn: LossFn, params: PyTree) -> Operator:
  """v -> theta * H (theta * v): diagonal theta_i^2 H_ii, trace tr(D H D), D = diag(|theta|).

  Estimating the per-parameter terms through this operator (rather than multiplying a raw
  estimate of H_ii by theta_i^2) keeps them exactly invariant under diagonal rescalings
  theta -> c * theta with H -> H / (c c^T): the operator itself is unchanged.
  """
  op = hessian_op(loss_fn, params)
  scale = lambda t: jax.tree.map(jnp.multiply, params, t)  # noqa: E731
  return lambda v: scale(op(scale(v)))


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
    return hutchinson_diagonal(op, params, key=key, num_probes=num_probes, chunk=chunk).value
  if method == 'exact':
    return exact_diagonal(normalized_op(loss_fn, params), params)
  if method == 'gauss_newton':
    if logits_fn is None or images is None:
      raise ValueError("method='gauss_newton' needs logits_fn and images")
    g = gauss_newton_diagonal(logits_fn, params, images)
    return jax.tree.map(lambda t, d: jnp.square(t) * d, params, g)
  raise ValueError(f"method must be 'hutchinson', 'exact' or 'gauss_newton', got {method!r}")


def sigma_optimised(kappa: PyTree, lam: float) -> jax.Array:
  """The sigma-optimised normalized measure (a reconstruction, see docs/flatness.md): the sum over
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


class NormProducts(NamedTuple):
  """Products over layers of each weight's spectral and Frobenius norms (scalars)."""

  spectral_product: jax.Array
  frobenius_product: jax.Array


def matrix_norm_products(weights: list[jax.Array]) -> NormProducts:
  """The matrix-norm baselines: products over layers of the spectral and of the Frobenius
  norms of each weight, reshaped to (fan_in, out) (a conv kernel's spectral norm here is
  that of its reshaped matrix, not of the convolution). They are invariant to layer-wise
  rescaling (alpha W_1, W_2 / alpha) but not to neuron-wise rescaling. Traceable (jit)."""
  mats = [jnp.reshape(w, (-1, jnp.shape(w)[-1])) for w in weights]
  return NormProducts(
    jnp.prod(jnp.stack([jnp.linalg.norm(m, 2) for m in mats])),
    jnp.prod(jnp.stack([jnp.linalg.norm(m) for m in mats])),
  )


def path_norm(
  apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, shape, dtype=None
) -> jax.Array:
  """The (squared) path-norm of a ReLU network: the summed outputs of the network with every
  parameter squared on an all-ones input of `shape` (one example), as in Jiang et al.
  Traceable (jit); only a plain ReLU chain computes it (see `inapplicable_measures`)."""
  squared = jax.tree.map(jnp.square, params)
  return jnp.sum(apply_fn(squared, jnp.ones((1, *shape), dtype)))


def sharpness_sigma(
  error_fn: Callable[[PyTree], jax.Array],
  params: PyTree,
  *,
  key: jax.Array,
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
  z = per_leaf_random(jax.random.normal, params, (num_samples,), key=key)
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


class Measures(NamedTuple):
  """Every measure of `measure_fn` at one network (scalars; see its docstring). A measure that
  does not apply to the network is None (`inapplicable_measures`)."""

  hessian_trace: jax.Array
  hessian_trace_stderr: jax.Array
  top_eigenvalue: jax.Array
  gauss_newton_trace: jax.Array
  pac_bayes_sharpness: jax.Array
  param_norm: jax.Array
  spectral_product: jax.Array | None  # None on a conv network: see reshaped_spectral_product
  frobenius_product: jax.Array
  normalized_trace: jax.Array
  normalized_trace_stderr: jax.Array
  normalized_trace_gn: jax.Array
  sigma_optimised: jax.Array
  normalized_sqrt: jax.Array
  pac_bayes_mag_flatness: jax.Array
  path_norm: jax.Array | None  # None unless the network is a plain ReLU chain
  filter_normalized_trace: jax.Array
  filter_normalized_trace_stderr: jax.Array
  reshaped_spectral_product: jax.Array | None = None  # a conv network's spectral_product

  def to_json(self) -> dict[str, float]:
    """{name: float} of the measures that apply (fetches them from the device)."""
    return {k: float(v) for k, v in jax.device_get(self._asdict()).items() if v is not None}


def _measures(
  apply_fn, params, images, labels, key, *, num_probes, chunk, lanczos_iters, lam,
  sharpness_target, sharpness_samples, sharpness_iters, gn_chunk,
) -> Measures:  # fmt: skip
  """Every measure of `measure_fn`, unchecked (traced inside its jit)."""
  loss_fn = lambda p: cross_entropy(apply_fn(p, images), labels)  # noqa: E731
  error_fn = lambda p: jnp.mean(jnp.argmax(apply_fn(p, images), -1) != labels)  # noqa: E731
  keys = jax.random.split(key, 6)
  h = hessian_op(loss_fn, params)
  tr = hutchinson_trace(h, params, key=keys[0], num_probes=num_probes, chunk=chunk)
  ntr = hutchinson_trace(
    normalized_op(loss_fn, params), params, key=keys[1], num_probes=num_probes, chunk=chunk
  )
  ftr = hutchinson_trace(
    filter_normalized_op(loss_fn, params), params, key=keys[2], num_probes=num_probes, chunk=chunk
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
  sigma_raw = sharpness_sigma(error_fn, params, key=keys[4], magnitude=False, **sharp)
  sigma_mag = sharpness_sigma(error_fn, params, key=keys[5], magnitude=True, **sharp)
  norms = matrix_norm_products([w for w in jax.tree.leaves(params) if w.ndim >= 2])
  return Measures(
    hessian_trace=tr.value,
    hessian_trace_stderr=tr.stderr,
    top_eigenvalue=top_eigenvalues(h, params, key=keys[3], k=1, num_iters=lanczos_iters)[0],
    gauss_newton_trace=jnp.sum(gn),
    pac_bayes_sharpness=1.0 / jnp.square(sigma_raw),
    param_norm=jnp.sum(jnp.square(theta)),
    spectral_product=norms.spectral_product,
    frobenius_product=norms.frobenius_product,
    normalized_trace=ntr.value,
    normalized_trace_stderr=ntr.stderr,
    normalized_trace_gn=jnp.sum(kappa),
    sigma_optimised=pac_bayes.second_order_objective(kappa, lam),
    normalized_sqrt=jnp.sum(jnp.sqrt(kappa)),
    pac_bayes_mag_flatness=1.0 / jnp.square(sigma_mag),
    path_norm=path_norm(apply_fn, params, images.shape[1:], images.dtype),
    filter_normalized_trace=ftr.value,
    filter_normalized_trace_stderr=ftr.stderr,
  )


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
) -> Callable[..., Measures]:
  """`fn(params, images, labels, *, key) -> Measures`: every measure of a ReLU classifier
  at `params` on (images, labels) with the mean cross-entropy loss, in one jit (non-finite
  parameters, images and out-of-range labels are refused by name first).

  Build it once per architecture: the parameters are a jit argument (see `flatness.hessian`),
  so models of the same shapes share one compilation. Scale-dependent ('raw') measures:
  hessian_trace, top_eigenvalue (Lanczos), gauss_newton_trace, pac_bayes_sharpness (1/sigma^2,
  isotropic noise), param_norm (sum theta^2), spectral_product, frobenius_product. Invariant
  to every diagonal function-preserving rescaling: normalized_trace tr(D H D) (Hutchinson on
  `normalized_op`), normalized_trace_gn (sum theta_i^2 G_ii), sigma_optimised (at `lam`),
  normalized_sqrt (sum |theta_i| sqrt(G_ii), its ln(1+x) <= x closed form),
  pac_bayes_mag_flatness (1/sigma^2, magnitude-aware noise) and path_norm. Invariant to filter
  scaling only: filter_normalized_trace. `*_stderr` fields are Hutchinson standard errors.
  For a network that is not a plain ReLU chain, path_norm is None, and for a conv network
  spectral_product is None and its value is reshaped_spectral_product (`inapplicable_measures`
  says why). `Measures.to_json()` gives the measures that apply as Python floats.
  """
  _check_probes(num_probes, chunk)
  settings = dict(
    num_probes=num_probes, chunk=chunk, lanczos_iters=lanczos_iters, lam=lam, gn_chunk=gn_chunk,
    sharpness_target=sharpness_target, sharpness_samples=sharpness_samples,
    sharpness_iters=sharpness_iters,
  )  # fmt: skip
  jitted = jax.jit(functools.partial(_measures, apply_fn, **settings))
  caveats: list[dict] = []  # inapplicable_measures, found at the first call

  def checked(params, images, labels, *, key):
    # On the host, before the jit: a nan would only give nan measures.
    check_params(params)
    check_images(images, pixel_range=None, ndim=None)
    check_labels_for(lambda x: apply_fn(params, x), images, labels)
    if not caveats:
      caveats.append(inapplicable_measures(apply_fn, params, images.shape[1:]))
    out = jitted(params, images, labels, key)
    if 'path_norm' in caveats[0]:
      out = out._replace(path_norm=None)
    if 'spectral_product' in caveats[0]:
      out = out._replace(spectral_product=None, reshaped_spectral_product=out.spectral_product)
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

  - 'path_norm' (refused: None in `measure_fn`'s results): the squared-parameter network
    computes the path norm only for a chain of linear maps, biases and ReLUs; batch norm, input
    normalisation, max or average pooling and other operations break that.
  - 'spectral_product' (labelled: None, its value in 'reshaped_spectral_product'): a conv kernel's
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
