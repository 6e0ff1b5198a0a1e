"""PAC-Bayes arithmetic against known values, closed forms and monotonicity."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from tsuzuku_jax.flatness import pac_bayes, posterior


def test_binary_kl_known_values():
  assert pac_bayes.binary_kl(0.05, 0.30) == pytest.approx(0.2005, abs=5e-5)
  assert pac_bayes.binary_kl(0.5, 0.5) == 0.0
  assert pac_bayes.binary_kl(0.0, 0.5) == pytest.approx(math.log(2))
  assert pac_bayes.binary_kl(0.2, 0.0) == math.inf


@pytest.mark.parametrize('q', [0.0, 1e-6, 0.03, 0.5, 0.97, 1.0])
@pytest.mark.parametrize('b', [1e-8, 0.01, 0.3, 2.0])
def test_kl_inversion_is_exact_and_monotone(q, b):
  p = pac_bayes.kl_inverse_upper(q, b)
  assert q <= p <= 1.0
  # Rounded outward: kl at the answer is >= b, and equals it wherever float64 resolves it
  # (1 - p above 1e-12, p above 1e-300).
  assert p == 1.0 or pac_bayes.binary_kl(q, p) >= b
  if 1e-12 < 1.0 - p:
    assert pac_bayes.binary_kl(q, p) == pytest.approx(b, rel=1e-9, abs=1e-12)
  assert pac_bayes.kl_inverse_upper(q, 1.5 * b) >= p
  low = pac_bayes.kl_inverse_lower(q, b)
  assert 0.0 <= low <= q
  assert low == 0.0 or pac_bayes.binary_kl(q, low) >= b or low < 1e-300
  if low > 1e-300:
    assert pac_bayes.binary_kl(q, low) == pytest.approx(b, rel=1e-9, abs=1e-12)


def _exact_kl(q, p):
  """kl(q || p) for the exact binary values of the floats q and p, in 60-digit arithmetic."""
  import mpmath

  with mpmath.workdps(60):
    q, p = mpmath.mpf(q), mpmath.mpf(p)
    term = lambda a, b: (
      mpmath.mpf(0) if a == 0 else (mpmath.inf if b == 0 else a * mpmath.log(a / b))
    )  # noqa: E501, E731
    return term(q, p) + term(1 - q, 1 - p)


def _grid_and_random_points():
  qs = [0.0, 1e-300, 1e-12, 1e-6, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1 - 1e-12, 1.0]
  cs = [1e-15, 1e-12, 1e-9, 1e-6, 1e-3, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0]
  rng = np.random.default_rng(0)
  rand = [(float(rng.random() ** 3), float(10 ** rng.uniform(-15, 1))) for _ in range(300)]
  return [(q, c) for q in qs for c in cs] + rand


def test_kl_inversion_keeps_its_promise_against_60_digit_arithmetic():
  # Observed: kl_inverse_upper(0.1, 0.01) = 0.1476755392980073, whose exact kl is below 0.01.
  assert _exact_kl(0.1, pac_bayes.kl_inverse_upper(0.1, 0.01)) >= 0.01
  for q, c in _grid_and_random_points():
    up, low = pac_bayes.kl_inverse_upper(q, c), pac_bayes.kl_inverse_lower(q, c)
    assert q <= up <= 1 and 0 <= low <= q
    # Never below (above) the exact inverse: the exact kl at the answer reaches c.
    assert up == 1.0 or _exact_kl(q, up) >= c, (q, c, up)
    assert low == 0.0 or _exact_kl(q, low) >= c, (q, c, low)
    # And within 1e-9 of it: 1e-9 closer to q, the exact kl is below c.
    assert up - 1e-9 <= q or _exact_kl(q, up - 1e-9) < c, (q, c, up)
    assert low + 1e-9 >= q or _exact_kl(q, low + 1e-9) < c, (q, c, low)


def test_binary_kl_is_accurate_near_q_equals_p():
  for q, p in [(0.1, 0.1 + 1e-9), (0.5, 0.5 - 1e-12), (1e-8, 2e-8), (0.3, 0.9)]:
    exact = float(_exact_kl(q, p))
    assert pac_bayes.binary_kl(q, p) == pytest.approx(exact, rel=1e-13)


def test_bounds_are_monotone_and_langford_seeger_is_tighter():
  m, delta = 1000, 0.05
  prev = 0.0
  for kl in (0.0, 1.0, 10.0, 100.0, 1000.0):
    ls = pac_bayes.langford_seeger(0.05, kl, m, delta)
    assert ls >= prev and ls <= pac_bayes.mcallester(0.05, kl, m, delta)
    prev = ls
  assert pac_bayes.langford_seeger(0.05, 10, 10 * m, delta) < pac_bayes.langford_seeger(
    0.05, 10, m, delta
  )
  assert pac_bayes.langford_seeger(0.05, 10, m, 0.01) > pac_bayes.langford_seeger(0.05, 10, m, 0.1)
  assert pac_bayes.langford_seeger(0.10, 10, m, delta) > pac_bayes.langford_seeger(
    0.05, 10, m, delta
  )
  # ln(2 sqrt(1000) / 0.05) = ln(1264.9) = 7.1428 (the notes round it to 7.1).
  assert pac_bayes.complexity(0.0, m, delta) * m == pytest.approx(7.1428, abs=1e-4)


def test_gaussian_kl_closed_forms():
  assert pac_bayes.gaussian_kl(0.0, 1.0, 0.0, 1.0) == 0.0
  # 1-D: 0.5 ((s^2 + d^2) / t^2 - 1 + ln(t^2 / s^2)).
  assert pac_bayes.gaussian_kl(1.0, 0.5, 0.0, 2.0) == pytest.approx(
    0.5 * ((0.25 + 1.0) / 4.0 - 1.0 + math.log(16.0))
  )
  mu = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
  sig = {'w': jnp.full((2, 3), 0.5), 'b': jnp.full(3, 0.5)}
  zero = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}
  total = pac_bayes.gaussian_kl(mu, sig, zero, 1.0)
  expect = 6 * 0.5 * (0.25 + 1 - 1 + math.log(4)) + 3 * 0.5 * (0.25 - 1 + math.log(4))
  assert total == pytest.approx(expect)


def test_mc_certificate_chains_the_two_bounds():
  errs = np.full(100, 0.04)
  out = pac_bayes.mc_certificate(errs, kl=50.0, m=1000, delta=0.025, delta_mc=0.01)
  assert out.emp_mean == pytest.approx(0.04) and out.samples == 100 and out.kl == 50.0
  assert out.emp_upper == pytest.approx(pac_bayes.kl_inverse_upper(0.04, math.log(200) / 100))
  assert out.bound == pytest.approx(pac_bayes.langford_seeger(out.emp_upper, 50, 1000, 0.025))
  assert out.bound > out.emp_upper > 0.04 and out.confidence == pytest.approx(0.965)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r'delta .*\(0, 1\)'):
    pac_bayes.langford_seeger(0.1, 1.0, 100, 1.0)
  with pytest.raises(ValueError, match='delta_mc'):
    pac_bayes.mc_certificate([0.1], 1.0, 100, 0.05, 0.0)
  with pytest.raises(ValueError, match='emp_risk'):
    pac_bayes.mcallester(1.5, 1.0, 100, 0.05)
  with pytest.raises(ValueError, match='KL'):
    pac_bayes.langford_seeger(0.1, -1.0, 100, 0.05)
  with pytest.raises(ValueError, match='sample size'):
    pac_bayes.langford_seeger(0.1, 1.0, 0, 0.05)
  with pytest.raises(ValueError, match='standard deviations'):
    pac_bayes.gaussian_kl(0.0, 0.0, 0.0, 1.0)


def test_optimal_sigma_ratio_solves_its_first_order_condition():
  lam = 0.3
  kappa = jnp.asarray([1e-9, 0.02, 0.5, 3.0, 4e4])
  u = pac_bayes.optimal_sigma_ratio(kappa, lam)
  np.testing.assert_allclose(u**2 + u, lam / kappa, rtol=1e-5)
  # A small step either way raises the objective: a minimum.
  obj = lambda v: 0.5 * v * kappa + 0.5 * lam * jnp.log1p(1 / v)  # noqa: E731
  assert np.all(obj(u) <= obj(u * 1.01)) and np.all(obj(u) <= obj(u * 0.99))
  assert float(pac_bayes.optimal_sigma_ratio(jnp.asarray([0.0]), lam)[0]) == math.inf


@pytest.mark.parametrize('q', [0.0, 0.01, 0.2, 0.6])
@pytest.mark.parametrize('b', [1e-4, 0.02, 0.5])
def test_quad_objective_upper_bounds_the_kl_inverse(q, b):
  # f_quad = (sqrt(q + B/2) + sqrt(B/2))^2 >= kl^-1(q, B) (Perez-Ortiz et al.), B built from
  # KL, m and delta exactly as the Langford-Seeger bound builds it.
  m, delta = 1000, 0.05
  kl = b * m - math.log(2 * math.sqrt(m) / delta)
  if kl < 0:
    pytest.skip('B below the confidence term alone')
  assert float(posterior.quad_objective(q, kl, m, delta)) >= pac_bayes.langford_seeger(
    q, kl, m, delta
  )


def _softmax_regression(key):
  import jax

  x = jax.random.normal(key, (300, 5))
  w_true = jax.random.normal(jax.random.fold_in(key, 1), (5, 3))
  y = jnp.argmax(x @ w_true, -1)
  apply = lambda p, x: x @ p['w'] + p['b']  # noqa: E731
  return x, y, apply, {'w': 0.5 * w_true, 'b': jnp.zeros(3)}


def test_fit_posterior_lowers_the_objective_and_certify_is_a_valid_chain(key):
  import jax

  x, y, apply, prior = _softmax_regression(key)
  kl = posterior._kl_to_isotropic(prior, jax.tree.map(lambda t: jnp.full_like(t, 0.3), prior),
                                  jax.tree.map(jnp.zeros_like, prior), 0.5)  # fmt: skip
  ref = pac_bayes.gaussian_kl(prior, 0.3, jax.tree.map(jnp.zeros_like, prior), 0.5)
  assert float(kl) == pytest.approx(ref, rel=1e-5)
  fit = jax.jit(lambda k: posterior.fit_posterior(apply, prior, 0.3, x, y, key=k, steps=300))
  mean, sigma, _ = fit(key)

  def objective(mean, sigma):
    # f_quad on all 300 examples, the risk averaged over 256 noise draws (fit_posterior's
    # returned value is one draw on one minibatch: too noisy to compare).
    def risk(k):
      return posterior.bounded_cross_entropy(
        apply(posterior.sample_params(mean, sigma, key=k), x), y
      )

    r = jnp.mean(jax.vmap(risk)(jax.random.split(jax.random.fold_in(key, 9), 256)))
    kl = posterior._kl_to_isotropic(mean, sigma, prior, 0.3)
    return float(posterior.quad_objective(r, kl, 300, 0.025))

  # The same noise draws at both points: the comparison is not at the mercy of Monte Carlo.
  start = objective(prior, jax.tree.map(lambda t: jnp.full_like(t, 0.3), prior))
  assert objective(mean, sigma) < 0.97 * start
  cert = posterior.certify(apply, mean, sigma, prior, 0.3, x, y, key=key, rounds=3,
                           delta=0.025, delta_mc=0.01, chunk=128)  # fmt: skip
  assert cert.emp_mean <= cert.emp_upper <= cert.bound <= 1 and cert.samples == 900
  assert cert.bound == pytest.approx(pac_bayes.langford_seeger(cert.emp_upper, cert.kl, 300, 0.025))
  # A tiny posterior samples the mean network: its error, also with a padded last chunk.
  tiny = jax.tree.map(lambda t: jnp.full_like(t, 1e-9), mean)
  errs = posterior.sampled_errors(apply, mean, tiny, x, y, key=key, num_samples=3, chunk=128)
  want = float(jnp.mean(jnp.argmax(apply(mean, x), -1) != y))
  np.testing.assert_allclose(errs, want, atol=1e-7)
  with pytest.raises(ValueError, match='prior_sigma'):
    posterior.fit_posterior(apply, prior, 0.0, x, y, key=key)
  with pytest.raises(ValueError, match='delta'):
    posterior.fit_posterior(apply, prior, 0.1, x, y, key=key, delta=1.5)


def test_mc_certificate_from_counts_uses_every_draw():
  out = pac_bayes.mc_certificate_from_counts(1200, 300_000, kl=50.0, m=30_000, delta=0.025,
                                             delta_mc=0.01)  # fmt: skip
  assert out.emp_mean == 0.004 and out.samples == 300_000
  assert out.emp_upper == pac_bayes.kl_inverse_upper(0.004, math.log(200) / 300_000)
  assert out.bound == pac_bayes.langford_seeger(out.emp_upper, 50.0, 30_000, 0.025)
  with pytest.raises(ValueError, match='errors must be in'):
    pac_bayes.mc_certificate_from_counts(11, 10, 1.0, 10, 0.05, 0.01)
  with pytest.raises(ValueError, match='draws'):
    pac_bayes.mc_certificate_from_counts(0, 0, 1.0, 10, 0.05, 0.01)


def _mlp(key):
  import jax

  from tsuzuku_jax import models

  model = models.MLP(3, (6, 4))
  params = model.init(key, jnp.zeros((1, 2, 2, 1)))['params']
  sigma = jax.tree.map(lambda t: jnp.full_like(t, 0.4), params)
  return model, params, sigma


def test_local_reparametrisation_has_the_per_example_networks_distribution(key):
  """Every logit of an example has the same distribution under the local reparametrisation as
  under a full draw of the network (two-sample KS on 4000 draws each), and rows are
  independent draws (one example repeated: the rows differ)."""
  import jax
  import scipy.stats

  model, params, sigma = _mlp(key)
  x = jnp.repeat(jax.random.uniform(jax.random.fold_in(key, 1), (1, 2, 2, 1)), 4000, 0)
  lrt = posterior.local_reparam_logits(model)(params, sigma, jax.random.fold_in(key, 2), x)
  full = posterior.per_example_logits(lambda p, x: model.apply({'params': p}, x))(
    params, sigma, jax.random.fold_in(key, 3), x
  )
  for k in range(3):
    assert scipy.stats.ks_2samp(np.asarray(lrt[:, k]), np.asarray(full[:, k])).pvalue > 1e-3
  assert float(jnp.std(lrt[:, 0])) > 0.1 and float(jnp.std(full[:, 0])) > 0.1
  # Correlation between logits of one network is kept (not independent logits).
  c_lrt, c_full = (np.corrcoef(np.asarray(a[:, :2]).T)[0, 1] for a in (lrt, full))
  assert abs(c_lrt - c_full) < 0.1


def test_local_reparametrisation_refuses_what_it_cannot_sample_exactly(key):
  import flax.linen as nn
  import jax

  class Shared(nn.Module):  # one Dense applied twice: its weights are shared
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(4)
      return d(nn.relu(d(x.reshape(x.shape[0], -1)[:, :4])))

  for model, shape in ((Shared(), (1, 2, 2, 1)), (nn.Conv(2, (3, 3)), (1, 4, 4, 1))):
    params = model.init(key, jnp.zeros(shape))['params']
    sig = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match='per_example_logits'):
      posterior.local_reparam_logits(model)(params, sig, key, jnp.zeros((2, *shape[1:])))


def test_mc_error_sums_resume_equals_one_call_and_pads_chunks(key):
  import jax

  model, params, sigma = _mlp(key)
  x = jax.random.uniform(jax.random.fold_in(key, 1), (37, 2, 2, 1))
  y = jnp.arange(37) % 3
  fn = posterior.local_reparam_logits(model)
  once = posterior.mc_error_sums(fn, params, sigma, x, y, key=key, rounds=4, chunk=10)
  half = posterior.mc_error_sums(fn, params, sigma, x, y, key=key, rounds=1, chunk=10)
  rest = posterior.mc_error_sums(fn, params, sigma, x, y, key=key, rounds=3, chunk=10, sums=half)
  assert (once.rounds, once.errors, once.draws) == (rest.rounds, rest.errors, rest.draws)
  assert once.draws == 148 and 0 < once.errors < 148
  # A vanishing sigma samples the mean network in every draw: its errors, counted exactly.
  tiny = jax.tree.map(lambda t: jnp.full_like(t, 1e-12), sigma)
  want = int(jnp.sum(jnp.argmax(model.apply({'params': params}, x), -1) != y))
  got = posterior.mc_error_sums(fn, params, tiny, x, y, key=key, rounds=2, chunk=10)
  assert got.errors == 2 * want and got.draws == 74
