"""Tests for tsuzuku_jax.models: plain Flax models, certified by the jaxpr analysis.

Independent references: the exact float64 SVDs of the dense layers and of the conv + batch-norm
matrix, the input Jacobian of the logits (jax.jacrev: its spectral norm is the local Lipschitz
constant, a lower bound on any global bound) and empirical ratios ||f(x) - f(x')|| / ||x - x'||.
Batch-norm statistics and scales are randomised so that the folded conv + BN bounds are
exercised. The expensive numbers are computed once per model and shared between tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_variables import random_variables

from tsuzuku_jax import lmt, models, train_lib

K = 10
CONFIGS = {
  'mlp': (dict(hidden=(24, 16), mean=(0.5,), std=(0.25,)), (8, 8, 1)),
  'cnn': (dict(channels=(4, 8), dense=16), (8, 8, 1)),
  'wrn': (dict(depth=10, width=1), (8, 8, 3)),
  'liresnet': (dict(width=4, depth=2, neck=8, dense=16), (8, 8, 1)),
  # GloRo's 2C2F form: strided 4x4 convs, no pooling, MinMax activations.
  'cnn_minmax': (
    dict(channels=(4, 8), dense=16, batch_norm=False, activation='minmax', kernel=4, strides=2),
    (8, 8, 1),
  ),
}
N_JAC, N_PAIRS = 8, 32


@functools.cache
def _setup(name):
  """(model, variables, input shape); `init` is traced (eval_shape), values come from numpy."""
  kwargs, shape = CONFIGS[name]
  model = models.get_model(name.split('_')[0], K, **kwargs)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return model, random_variables(shapes, np.random.default_rng(1)), shape


@functools.cache
def _numbers(name):
  """The certificate, Jacobians and empirical ratios of one model."""
  model, variables, shape = _setup(name)
  apply_fn = train_lib.apply_fn(model)
  rng = np.random.default_rng(2)
  x_jac = rng.uniform(0, 1, (N_JAC, *shape)).astype(np.float32)
  x1 = rng.uniform(0, 1, (2 * N_PAIRS, *shape)).astype(np.float32)
  x2 = np.concatenate(
    [
      rng.uniform(0, 1, (N_PAIRS, *shape)),  # far pairs
      x1[N_PAIRS:] + 1e-2 * rng.standard_normal((N_PAIRS, *shape)),  # near pairs
    ]
  ).astype(np.float32)

  @jax.jit
  def run(variables, x_jac, x1, x2):
    logits = lambda x: apply_fn(variables, x)  # noqa: E731
    jac = jax.vmap(jax.jacrev(lambda x: logits(x[None])[0]))(x_jac)
    return jac, logits(x1), logits(x2)

  jac, z1, z2 = run(variables, x_jac, x1, x2)
  return dict(
    cert=lmt.certificate(apply_fn, variables, shape),
    jac=np.asarray(jac, np.float64).reshape(N_JAC, K, -1),
    ratios=np.linalg.norm(np.asarray(z1 - z2, np.float64), axis=-1)
    / np.linalg.norm((x1 - x2).reshape(len(x1), -1).astype(np.float64), axis=-1),
  )


@pytest.mark.parametrize('name', CONFIGS)
def test_plain_flax_models_collections_and_logits(name):
  model, variables, shape = _setup(name)
  assert set(variables) == ({'params', 'batch_stats'} if name in ('cnn', 'wrn') else {'params'})
  x = np.random.default_rng(3).uniform(0, 1, (3, *shape)).astype(np.float32)
  logits = jax.jit(train_lib.apply_fn(model))(variables, x)
  assert logits.shape == (3, K) and np.all(np.isfinite(np.asarray(logits)))
  # Training mode: batch statistics, the running ones updated in `batch_stats`.
  out, updates = jax.jit(
    lambda v: model.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
    )
  )(variables)
  assert out.shape == (3, K)
  assert set(updates) == ({'batch_stats'} if 'batch_stats' in variables else set())


@pytest.mark.parametrize('name', CONFIGS)
def test_certificate_bounds_jacobian_and_empirical_ratios(name):
  out = _numbers(name)
  cert = out['cert']
  bound, pair = cert.lipschitz, np.asarray(cert.pairwise, np.float64)
  jac = out['jac']
  assert np.all(np.isfinite(jac)) and bound > 0
  # Local Lipschitz constant of the whole logit map (spectral norm of the Jacobian).
  spectral = max(np.linalg.svd(j, compute_uv=False)[0] for j in jac)
  assert spectral <= bound, (spectral, bound)
  # Gradients of logit differences z_i - z_j: bounded by the pairwise bounds and sqrt(2) L.
  diff_grads = np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1)  # (N, K, K)
  assert np.all(diff_grads <= pair[None]), (diff_grads / np.where(pair > 0, pair, 1)).max()
  assert diff_grads.max() <= np.sqrt(2) * bound
  assert out['ratios'].max() <= bound, (out['ratios'].max(), bound)
  assert 0 < spectral and np.isfinite(bound)


def test_mlp_certificate_is_the_product_of_exact_svds():
  _, variables, _ = _setup('mlp')
  cert = _numbers('mlp')['cert']
  params = variables['params']
  svd = lambda w: np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0]  # noqa: E731
  head = np.asarray(params['head']['kernel'], np.float64)
  below = 1 / 0.25 * svd(params['dense0']['kernel']) * svd(params['dense1']['kernel'])
  assert cert.lipschitz >= below * svd(head)
  np.testing.assert_allclose(cert.lipschitz, below * svd(head), rtol=1e-5)
  pairwise = below * np.linalg.norm(head[:, :, None] - head[:, None, :], axis=0)
  assert np.all(cert.pairwise >= pairwise * (1 - 1e-7))
  np.testing.assert_allclose(cert.pairwise, pairwise, rtol=1e-5, atol=1e-6)
  assert [s.exact for s in cert.segments] == [True, True, True]


@pytest.mark.parametrize('name', CONFIGS)
def test_converged_below_certificate_per_segment(name):
  rows = lmt.segment_report(_numbers(name)['cert'], key=jax.random.key(0))
  assert rows and rows[-1]['where'] == 'logits'
  for row in rows:
    # Power iteration is a lower bound, a certificate an upper bound, for every segment.
    assert row['certificate_over_converged'] >= 1.0, row
    if row['exact']:
      assert row['certificate_over_converged'] <= 1.01, row  # float64 SVD vs 500 steps


def test_cnn_conv_bn_segment_against_dense_svd():
  # conv + batch norm (running statistics) is one segment: conv(x) * scale, bounded exactly.
  _, variables, _ = _setup('cnn')
  params, stats = variables['params'], variables['batch_stats']
  kernel = params['conv0']['kernel']
  n = 8 * 8 * 1
  eye = jnp.eye(n).reshape(n, 8, 8, 1)
  dn = ('NHWC', 'HWIO', 'NHWC')
  mat = jax.lax.conv_general_dilated(eye, kernel, (1, 1), 'SAME', dimension_numbers=dn)
  gamma = np.asarray(params['bn0']['scale'], np.float64)
  var = np.asarray(stats['bn0']['var'], np.float64)
  mat = np.asarray(mat, np.float64) * (gamma / np.sqrt(var + 1e-5))
  exact = np.linalg.svd(mat.reshape(n, -1), compute_uv=False)[0]
  seg = [s for s in _numbers('cnn')['cert'].segments if s.in_shape == (1, 8, 8, 1)]
  assert len(seg) == 1 and seg[0].exact
  np.testing.assert_allclose(seg[0].bound, exact, rtol=1e-5)
  assert seg[0].bound >= exact


def test_training_estimate_rises_to_the_converged_value():
  model, variables, shape = _setup('cnn')
  apply_fn = train_lib.apply_fn(model)
  step = jax.jit(lambda v, it: lmt.estimate(apply_fn, v, it, shape))
  iterates = lmt.init_iterates(apply_fn, variables, shape, key=jax.random.key(0))
  cert = _numbers('cnn')['cert']
  assert len(iterates) == len(cert.segments) - 1  # every segment but the exact last one
  estimates = []
  for _ in range(30):
    est, new = step(variables, iterates)
    assert isinstance(est, lmt.Estimate) and not isinstance(est, lmt.Certificate)
    estimates.append(float(est.lipschitz))
    iterates = new
  estimates = np.array(estimates)
  # A product of Rayleigh quotients that each never decrease (up to float32 rounding), below
  # the certificate, and close to it once converged (its segments are bounded exactly).
  assert np.all(np.diff(estimates) >= -1e-5 * estimates[1:]), np.diff(estimates)
  assert estimates[-1] <= cert.lipschitz
  assert estimates[-1] >= 0.95 * cert.lipschitz, (estimates[-1], cert.lipschitz)
  with pytest.raises(TypeError, match='Certificate'):
    lmt.certify(apply_fn, variables, np.zeros((1, *shape), np.float32), est)


@pytest.mark.parametrize('name', CONFIGS)
def test_bad_inputs_raise(name):
  model, variables, shape = _setup(name)
  flat = jnp.zeros((2, int(np.prod(shape))))
  with pytest.raises(ValueError, match=r'\(2, ' + str(int(np.prod(shape))) + r'\)'):
    jax.eval_shape(lambda v: model.apply(v, flat), variables)


def test_get_model_and_configuration_errors():
  with pytest.raises(ValueError, match='foo'):
    models.get_model('foo', 10)
  wrn = models.get_model('wrn', 10, depth=11)
  with pytest.raises(ValueError, match='6n'):
    jax.eval_shape(wrn.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  lir = models.get_model('liresnet', 10, activation='gelu')
  with pytest.raises(ValueError, match='gelu'):
    jax.eval_shape(lir.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  assert isinstance(models.get_model('cnn', 3), models.CNN)


def test_liresnet_minmax_needs_an_even_width():
  model = models.LiResNet(width=3, depth=1, neck=4, dense=4)
  with pytest.raises(ValueError, match='3 channels'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_minmax_is_a_pair_sort_in_values_derivatives_and_bounds():
  """models.minmax (one primitive, max/min inside) against jnp.sort of channel pairs: the same
  values, gradients, Hessian-vector products and vmapped values; the analysis bounds both by 1
  (the same certificate for a dense-minmax-dense network)."""
  x = jax.random.normal(jax.random.key(0), (3, 5, 6))
  x = x.at[0, 0, 1].set(x[0, 0, 0])  # a tie

  def sort(x):
    return jnp.sort(x.reshape(*x.shape[:-1], -1, 2), -1).reshape(x.shape)

  np.testing.assert_array_equal(models.minmax(x), sort(x))
  np.testing.assert_array_equal(jax.jit(models.minmax)(x), sort(x))
  np.testing.assert_array_equal(jax.vmap(models.minmax, 1, 1)(x), sort(x))
  f = lambda x: jnp.sum(jnp.sin(models.minmax(x)) * x)  # noqa: E731
  g = lambda x: jnp.sum(jnp.sin(sort(x)) * x)  # noqa: E731
  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-6)
  hvp = lambda h: jax.jvp(jax.grad(h), (x,), (jnp.cos(x),))[1]  # noqa: E731
  np.testing.assert_allclose(hvp(f), hvp(g), rtol=1e-5, atol=1e-6)
  w1 = jax.random.normal(jax.random.key(1), (12, 8))
  w2 = jax.random.normal(jax.random.key(2), (8, K))

  def net(act):
    return lambda v, x: act(x.reshape(x.shape[0], -1) @ v[0]) @ v[1]

  certs = [lmt.certificate(net(act), (w1, w2), (12,)) for act in (models.minmax, sort)]
  assert certs[0].lipschitz == certs[1].lipschitz
  np.testing.assert_array_equal(certs[0].pairwise, certs[1].pairwise)
  with pytest.raises(ValueError, match='odd'):
    models.minmax(jnp.zeros((2, 3)))
