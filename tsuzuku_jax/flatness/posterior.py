"""Gaussian posteriors over network parameters: sampling, PAC-Bayes-bound optimisation and
certification (Dziugaite & Roy 2017; Perez-Ortiz et al. 2021), on the bounds of
`flatness.pac_bayes`.

`fit_posterior` optimises N(mean, diag sigma^2) from a prior N(prior_mean, prior_sigma^2 I) by
Adam on `quad_objective`; `certify` bounds the stochastic classifier's expected error from
`sampled_errors` on examples the prior never saw (`pac_bayes.mc_certificate`).
"""

import math

import jax
import jax.numpy as jnp

from tsuzuku_jax import checks
from tsuzuku_jax.flatness.pac_bayes import (
  Certificate,
  _check_delta,
  _check_m,
  gaussian_kl,
  mc_certificate,
)


def sample_params(mean, sigma, *, key: jax.Array):
  """theta ~ N(mean, diag sigma^2) over pytrees."""
  leaves, treedef = jax.tree.flatten(mean)
  keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
  # Drawn flat and reshaped: the same values, a faster compile for 4-D kernels on XLA:CPU.
  return jax.tree.map(
    lambda m, s, k: m + s * jax.random.normal(k, (m.size,), m.dtype).reshape(m.shape),
    mean,
    sigma,
    keys,
  )


def _kl_to_isotropic(mean, sigma, prior_mean, prior_sigma) -> jax.Array:
  """KL(N(mean, diag sigma^2) || N(prior_mean, prior_sigma^2 I)) in jnp (differentiable)."""
  vp = prior_sigma**2

  def term(m, s, mp):
    v = jnp.square(s)
    return 0.5 * jnp.sum((v + jnp.square(m - mp)) / vp - 1.0 + jnp.log(vp / v))

  return sum(jax.tree.leaves(jax.tree.map(term, mean, sigma, prior_mean)))


def quad_objective(risk, kl, m: int, delta: float):
  """Perez-Ortiz et al.'s f_quad, (sqrt(risk + B/2) + sqrt(B/2))^2 with
  B = (KL + ln(2 sqrt(m)/delta)) / m: a differentiable upper bound on the Langford-Seeger
  bound's value (via Pinsker and a quadratic refinement), in jnp for training."""
  b = (kl + math.log(2.0 * math.sqrt(m) / delta)) / m
  return jnp.square(jnp.sqrt(risk + b / 2) + jnp.sqrt(b / 2))


def bounded_cross_entropy(logits: jax.Array, labels: jax.Array, p_min: float = 1e-4):
  """Mean of -ln(max(p_y, p_min)) / ln(1/p_min): a cross-entropy bounded in [0, 1], the risk
  that PAC-Bayes bounds for [0, 1] losses accept. logits (N, K), labels (N,) int."""
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)
  return jnp.mean(-jnp.maximum(logp, math.log(p_min))) / math.log(1.0 / p_min)


def fit_posterior(
  apply_fn,
  prior_mean,
  prior_sigma: float,
  images: jax.Array,
  labels: jax.Array,
  *,
  key: jax.Array,
  m: int | None = None,
  delta: float = 0.025,
  steps: int = 2000,
  batch_size: int = 128,
  learning_rate: float = 1e-3,
  p_min: float = 1e-4,
):
  """Optimises a Gaussian posterior N(mean, diag sigma^2), started at N(prior_mean,
  prior_sigma^2 I), by Adam on `quad_objective` with `bounded_cross_entropy` as the risk
  (one noise draw per step, by reparametrisation; minibatches drawn with `key`).

  Returns (mean, sigma, final objective). The prior must not depend on (images, labels): the
  certificate (`certify`) is only valid on examples the prior never saw. Concrete inputs are
  checked first (finite prior mean and images, labels in [0, K)); traced ones (inside your own
  jit) are not.
  """
  _check_delta(delta)
  if not prior_sigma > 0:
    raise ValueError(f'prior_sigma must be > 0, got {prior_sigma}')
  checks.check_params(prior_mean, 'prior_mean')
  checks.check_images(images, pixel_range=None, ndim=None)
  checks.check_labels_for(lambda x: apply_fn(prior_mean, x), images, labels)
  n = int(images.shape[0])
  m = _check_m(n if m is None else m)
  import optax

  rho0 = jax.tree.map(lambda x: jnp.full(x.shape, math.log(prior_sigma), x.dtype), prior_mean)
  params = {'mean': prior_mean, 'log_sigma': rho0}
  tx = optax.adam(learning_rate)

  def objective(p, k):
    kb, kn = jax.random.split(k)
    idx = jax.random.randint(kb, (min(batch_size, n),), 0, n)
    sigma = jax.tree.map(jnp.exp, p['log_sigma'])
    logits = apply_fn(sample_params(p['mean'], sigma, key=kn), images[idx])
    risk = bounded_cross_entropy(logits, labels[idx], p_min)
    kl = _kl_to_isotropic(p['mean'], sigma, prior_mean, prior_sigma)
    return quad_objective(risk, kl, m, delta)

  def step(carry, k):
    p, opt = carry
    val, g = jax.value_and_grad(objective)(p, k)
    upd, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, upd), opt), val

  (params, _), vals = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
  return params['mean'], jax.tree.map(jnp.exp, params['log_sigma']), vals[-1]


def sampled_errors(
  apply_fn, mean, sigma, images, labels, *, key, num_samples: int, chunk: int = 1024
):
  """(num_samples,) 0-1 errors of networks theta ~ N(mean, diag sigma^2) on (images, labels).

  Raises:
    InvalidInput: non-finite mean or sigma, non-finite images, or labels outside [0, K).
  """
  _check_m(num_samples, 'num_samples')
  checks.check_params(mean, 'mean')
  checks.check_params(sigma, 'sigma')
  checks.check_images(images, pixel_range=None, ndim=None)
  checks.check_labels_for(lambda x: apply_fn(mean, x), images, labels)
  n = int(images.shape[0])
  pad = -n % chunk if n > chunk else 0
  xs = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
  ys = jnp.concatenate([labels, jnp.full((pad,), -1, labels.dtype)])
  c = min(chunk, n)
  xs, ys = xs.reshape(-1, c, *images.shape[1:]), ys.reshape(-1, c)

  @jax.jit  # everything as arguments: closed-over data would be constant-folded by XLA
  def run(mean, sigma, xs, ys, keys):
    def one(k):
      p = sample_params(mean, sigma, key=k)
      wrong = jax.lax.map(
        lambda b: jnp.sum((jnp.argmax(apply_fn(p, b[0]), -1) != b[1]) & (b[1] >= 0)), (xs, ys)
      )
      return jnp.sum(wrong) / n

    return jax.lax.map(one, keys)

  return run(mean, sigma, xs, ys, jax.random.split(key, num_samples))


def certify(
  apply_fn,
  mean,
  sigma,
  prior_mean,
  prior_sigma,
  images,
  labels,
  *,
  key,
  num_samples: int,
  delta: float,
  delta_mc: float,
) -> Certificate:
  """`mc_certificate` of N(mean, diag sigma^2) against the prior N(prior_mean, prior_sigma^2 I)
  on (images, labels), which the prior must not have seen: with probability >= 1 - delta -
  delta_mc, its bound upper-bounds the stochastic classifier's expected test error."""
  errs = jax.device_get(
    sampled_errors(apply_fn, mean, sigma, images, labels, key=key, num_samples=num_samples)
  )
  kl = gaussian_kl(mean, sigma, prior_mean, prior_sigma)
  return mc_certificate(errs, kl, int(images.shape[0]), delta, delta_mc)
