"""Gaussian posteriors over network parameters: sampling, PAC-Bayes-bound optimisation and
certification (Dziugaite & Roy 2017; Perez-Ortiz et al. 2021), on the bounds of
`flatness.pac_bayes`.

`fit_posterior` optimises N(mean, diag sigma^2) from a prior N(prior_mean, prior_sigma^2 I) by
Adam on `quad_objective`; `certify` bounds the stochastic classifier's expected error on
examples the prior never saw (`pac_bayes.mc_certificate_from_counts`) from `mc_error_sums`:
rounds over the examples in which every example is classified by its own sampled network,
streamed in chunks under one jit and resumable from its partial sums. The per-example networks
come from `per_example_logits` (any model: a full draw per example) or `local_reparam_logits`
(networks whose parameters are all dense layers: exact, at about twice a forward pass).
`sampled_errors` evaluates whole networks on all examples (a network's own error).
"""

import functools
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsuzuku_jax import checks
from tsuzuku_jax.flatness.pac_bayes import (
  Certificate,
  _check_delta,
  _check_m,
  gaussian_kl,
  mc_certificate_from_counts,
)

# `logits_fn(mean, sigma, key, images) -> logits`: row i classified by its own network
# theta_i ~ N(mean, diag sigma^2), independent of the other rows' and of other keys' draws.
SampledLogits = Callable[[object, object, jax.Array, jax.Array], jax.Array]


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


def _chunks(images, labels, chunk: int):
  """(images, labels) as (chunks, min(chunk, n), ...) arrays; the last chunk padded with label
  -1 (masked by the counts)."""
  n = int(images.shape[0])
  c = min(chunk, n)
  pad = -n % c
  xs = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
  ys = jnp.concatenate([labels, jnp.full((pad,), -1, labels.dtype)])
  return xs.reshape(-1, c, *images.shape[1:]), ys.reshape(-1, c)


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
  xs, ys = _chunks(images, labels, chunk)

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


def per_example_logits(apply_fn, batch: int = 16) -> SampledLogits:
  """`SampledLogits` for any `apply_fn(params, images)`: a full parameter draw per example (its
  cost is one Gaussian per parameter per example), `batch` examples' networks at a time."""

  def logits(mean, sigma, key, images):
    def one(args):
      k, x = args
      return apply_fn(sample_params(mean, sigma, key=k), x[None])[0]

    keys = jax.random.split(key, images.shape[0])
    return jax.lax.map(one, (keys, images), batch_size=min(batch, images.shape[0]))

  return logits


def local_reparam_logits(model: nn.Module) -> SampledLogits:
  """`SampledLogits` of a Flax model whose parameters are all kernels and biases of `nn.Dense`
  layers applied once per example to (batch, features) inputs (an MLP): by the local
  reparametrisation (Kingma et al. 2015), exact here. With w ~ N(mu, diag s^2) independent of
  the layer's input h, h w + b is N(h mu + b_mu, h^2 s^2 + s_b^2) with independent units; the
  layers' draws are independent, so drawing each layer's outputs this way, per example, gives
  every example exactly the output distribution of its own network theta ~ Q. Params are
  `model.apply({'params': params}, x)`'s. Anything else (a conv, a Dense on a 3-D input or
  called twice: shared weights) raises ValueError when traced: use `per_example_logits`.
  """

  def logits(mean, sigma, key, images):
    seen = []

    def interceptor(next_fun, args, kwargs, context):
      mod = context.module
      if context.method_name != '__call__' or not isinstance(mod, nn.Dense):
        return next_fun(*args, **kwargs)  # a container; its parameters are checked below
      path = tuple(mod.scope.path)
      (x,) = args
      if path in seen or x.ndim != 2 or kwargs:
        raise ValueError(
          f'local reparametrisation is exact only for dense layers used once per example on '
          f'(batch, features) inputs; layer {"/".join(path)} is not (use per_example_logits)'
        )
      seen.append(path)
      mu, s = mean, sigma
      for name in path:
        mu, s = mu[name], s[name]
      out = jnp.dot(x, mu['kernel'])
      var = jnp.dot(jnp.square(x), jnp.square(s['kernel']))
      if 'bias' in mu:
        out, var = out + mu['bias'], var + jnp.square(s['bias'])
      noise = jax.random.normal(jax.random.fold_in(key, len(seen)), out.shape, out.dtype)
      return out + jnp.sqrt(var) * noise

    with nn.intercept_methods(interceptor):
      out = model.apply({'params': mean}, images)
    used = {('params', *p, leaf) for p in seen for leaf in ('kernel', 'bias')}
    for path, _ in jax.tree_util.tree_flatten_with_path({'params': mean})[0]:
      names = tuple(getattr(k, 'key', k) for k in path)
      if names not in used:
        raise ValueError(
          f'local reparametrisation: parameter {"/".join(map(str, names[1:]))} is not a dense '
          "layer's kernel or bias (use per_example_logits)"
        )
    return out

  return logits


# Jitted once per `logits_fn` (a static argument), so that resuming round by round does not
# recompile; everything else as arguments: closed-over data would be constant-folded by XLA.
@functools.partial(jax.jit, static_argnums=0)
def _mc_rounds(logits_fn, mean, sigma, xs, ys, round_keys):
  """Wrong predictions in each round (one per key), streaming over the chunks of (xs, ys)."""

  def one_round(k):
    def one_chunk(total, inp):
      i, x, y = inp
      z = logits_fn(mean, sigma, jax.random.fold_in(k, i), x)
      return total + jnp.sum((jnp.argmax(z, -1) != y) & (y >= 0)), None

    steps = (jnp.arange(xs.shape[0]), xs, ys)
    return jax.lax.scan(one_chunk, jnp.zeros((), jnp.int32), steps)[0]

  return jax.lax.map(one_round, round_keys)


class MCSums(NamedTuple):
  """Partial sums of the Monte Carlo estimate of E_Q L_S (JSON-able; resume from them)."""

  rounds: int  # whole passes over the m examples, each example with its own network
  errors: int  # wrong predictions so far
  draws: int  # (network, example) evaluations so far: rounds * m
  seconds: float  # time spent computing them (compilation included)


def mc_error_sums(
  logits_fn: SampledLogits,
  mean,
  sigma,
  images,
  labels,
  *,
  key: jax.Array,
  rounds: int,
  chunk: int = 1000,
  sums: MCSums | None = None,
) -> MCSums:
  """`rounds` more rounds of the Monte Carlo estimate on top of `sums`: in round r every example
  is classified by its own network from `logits_fn` (key fold_in(key, r)), so a resumed estimate
  equals an uninterrupted one. All rounds of a call run in one jit, streaming over chunks of
  `chunk` examples (the last padded and masked)."""
  _check_m(rounds, 'rounds')
  _check_m(chunk, 'chunk')
  sums = sums or MCSums(0, 0, 0, 0.0)
  n = int(images.shape[0])
  xs, ys = _chunks(images, labels, chunk)

  t0 = time.perf_counter()
  keys = jnp.stack([jax.random.fold_in(key, sums.rounds + r) for r in range(rounds)])
  wrong = [int(v) for v in jax.device_get(_mc_rounds(logits_fn, mean, sigma, xs, ys, keys))]
  return MCSums(
    rounds=sums.rounds + rounds,
    errors=sums.errors + sum(wrong),
    draws=sums.draws + rounds * n,
    seconds=sums.seconds + time.perf_counter() - t0,
  )


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
  rounds: int,
  delta: float,
  delta_mc: float,
  logits_fn: SampledLogits | None = None,
  chunk: int = 1000,
) -> Certificate:
  """The certificate of N(mean, diag sigma^2) against the prior N(prior_mean, prior_sigma^2 I)
  on (images, labels), which the prior must not have seen: with probability >= 1 - delta -
  delta_mc, its bound upper-bounds the stochastic classifier's expected test error. `rounds`
  rounds of `mc_error_sums` (rounds * m independent draws) with `logits_fn` (default
  `per_example_logits(apply_fn)`; `local_reparam_logits` is far faster for an MLP).

  Raises:
    InvalidInput: non-finite mean or sigma, non-finite images, or labels outside [0, K).
  """
  checks.check_params(mean, 'mean')
  checks.check_params(sigma, 'sigma')
  checks.check_images(images, pixel_range=None, ndim=None)
  checks.check_labels_for(lambda x: apply_fn(mean, x), images, labels)
  logits_fn = logits_fn or per_example_logits(apply_fn)
  sums = mc_error_sums(logits_fn, mean, sigma, images, labels, key=key, rounds=rounds,
                       chunk=chunk)  # fmt: skip
  kl = gaussian_kl(mean, sigma, prior_mean, prior_sigma)
  return mc_certificate_from_counts(sums.errors, sums.draws, kl, int(images.shape[0]), delta,
                                    delta_mc)  # fmt: skip
