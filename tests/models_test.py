"""Tests for tsuzuku_jax.models: the bound carried by the forward pass against lower bounds.

Independent references: the exact float64 SVDs of the dense layers, the input Jacobian of the
logits (jax.jacrev, its spectral norm is the local Lipschitz constant, a lower bound on any
global bound) and empirical ratios ||f(x) - f(x')|| / ||x - x'||. Batch-norm statistics and
scales are randomised so that the fused conv + BN bounds are exercised. Everything runs under
jax.jit; the expensive numbers are computed once per model and shared between tests.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_variables import random_variables

from tsuzuku_jax import models

K = 10
CONFIGS = {
  'mlp': (dict(hidden=(24, 16), mean=(0.5,), std=(0.25,)), (8, 8, 1)),
  'cnn': (dict(channels=(4, 8), dense=16), (8, 8, 1)),
  'wrn': (dict(depth=10, width=1), (8, 8, 3)),
}
N_JAC, N_PAIRS = 8, 32


def _strip_report(variables):
  return {k: v for k, v in variables.items() if k != 'lip_report'}


@functools.cache
def _setup(name):
  """(model, variables, input shape); `init` is traced (eval_shape), values come from numpy."""
  kwargs, shape = CONFIGS[name]
  model = models.get_model(name, K, **kwargs)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return model, random_variables(shapes, np.random.default_rng(1)), shape


def _report(collection):
  """{'layer/path': sigma} from a `lip_report` collection (one sow per call)."""
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(collection):
    keys = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    assert keys[-1] == 'sigma'
    out['/'.join(keys[:-1])] = float(value)
  return out


@functools.cache
def _numbers(name):
  """Everything the tests need from one model, from a single jitted call."""
  model, variables, shape = _setup(name)
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
    def bounds(mode):
      (_, b), rep = model.apply(variables, x1[:1], mode=mode, mutable=['lip_report'])
      return b, rep['lip_report']

    def logits(x):
      return model.apply(variables, x, mode='none')[0]

    jac = jax.vmap(jax.jacrev(lambda x: logits(x[None])[0]))(x_jac)
    return bounds('certificate'), bounds('converged'), jac, logits(x1), logits(x2)

  (cert, cert_rep), (conv, conv_rep), jac, z1, z2 = run(variables, x_jac, x1, x2)
  return dict(
    cert=jax.tree.map(np.asarray, cert),
    cert_report=_report(cert_rep),
    converged=jax.tree.map(np.asarray, conv),
    converged_report=_report(conv_rep),
    jac=np.asarray(jac, np.float64).reshape(N_JAC, K, -1),
    ratios=np.linalg.norm(np.asarray(z1 - z2, np.float64), axis=-1)
    / np.linalg.norm((x1 - x2).reshape(len(x1), -1).astype(np.float64), axis=-1),
  )


def test_init_collections_and_iterates():
  want = {
    'mlp': {'dense0': (1, 64), 'dense1': (1, 24), 'head': (1, 16)},
    'cnn': {'conv0': (1, 8, 8, 1), 'conv1': (1, 4, 4, 4), 'dense': (1, 32), 'head': (1, 16)},
  }
  for name, (kwargs, shape) in CONFIGS.items():
    model = models.get_model(name, K, **kwargs)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, *shape)))
    # init sows nothing into lip_report, so its variables can be passed back as they are.
    expected = {'params', 'lipschitz'} | ({'batch_stats'} if name != 'mlp' else set())
    assert set(shapes) == expected
    for layer, u_shape in want.get(name, {}).items():
      assert shapes['lipschitz'][layer]['u'].shape == u_shape
  # A real init, of a one-hidden-layer MLP: compiling jax.random per layer is slow on CPU.
  model = models.MLP(num_classes=3, hidden=(8,))
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 4, 4, 1)))
  assert variables['params']['dense0']['kernel'].shape == (16, 8)
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(variables['params']))
  for u in jax.tree.leaves(variables['lipschitz']):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(u)), 1.0, rtol=1e-5)


@pytest.mark.parametrize('name', CONFIGS)
def test_certificate_bounds_jacobian_and_empirical_ratios(name):
  out = _numbers(name)
  cert = out['cert']
  bound = float(cert.below * cert.head_norm)
  pair = np.asarray(cert.below * cert.head_pairwise, np.float64)
  jac = out['jac']
  assert np.all(np.isfinite(jac)) and bound > 0
  # Local Lipschitz constant of the whole logit map (spectral norm of the Jacobian).
  spectral = max(np.linalg.svd(j, compute_uv=False)[0] for j in jac)
  assert spectral <= bound, (spectral, bound)
  # Gradients of logit differences z_i - z_j: bounded by the pairwise bound and by
  # sqrt(2) * below * head_norm (||w_i - w_j|| <= sqrt(2) ||W||; below * head_norm alone bounds
  # ||J||, not ||grad(z_i - z_j)||, which can exceed it by up to sqrt(2)).
  diff_grads = np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1)  # (N, K, K)
  assert np.all(diff_grads <= pair[None]), (diff_grads / np.where(pair > 0, pair, 1)).max()
  assert diff_grads.max() <= np.sqrt(2) * bound
  # Empirical ratios, far and near pairs.
  assert out['ratios'].max() <= bound, (out['ratios'].max(), bound)
  # A bound of 0 or inf would pass the above; the lower bounds are not vacuous either.
  assert 0 < spectral and np.isfinite(bound)


def test_mlp_certificate_is_the_product_of_exact_svds():
  _, variables, _ = _setup('mlp')
  cert = _numbers('mlp')['cert']
  params = variables['params']
  svd = lambda w: np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0]
  below = 1 / 0.25 * svd(params['dense0']['kernel']) * svd(params['dense1']['kernel'])
  head = np.asarray(params['head']['kernel'], np.float64)
  np.testing.assert_allclose(float(cert.below), below, rtol=1e-5)
  np.testing.assert_allclose(float(cert.head_norm), svd(head), rtol=1e-5)
  assert float(cert.below * cert.head_norm) >= below * svd(head)
  np.testing.assert_allclose(float(cert.below * cert.head_norm), below * svd(head), rtol=1e-5)
  pairwise = np.linalg.norm(head[:, :, None] - head[:, None, :], axis=0)
  np.testing.assert_allclose(np.asarray(cert.head_pairwise), pairwise, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', CONFIGS)
def test_converged_below_certificate_per_layer(name):
  out = _numbers(name)
  cert, conv = out['cert'], out['converged']
  assert float(conv.below * conv.head_norm) <= float(cert.below * cert.head_norm)
  cert_rep, conv_rep = out['cert_report'], out['converged_report']
  assert cert_rep.keys() == conv_rep.keys() and 'head' in cert_rep
  ratios = {layer: cert_rep[layer] / conv_rep[layer] for layer in cert_rep}
  for layer, r in ratios.items():
    # Power iteration is a lower bound, a certificate an upper bound, for every layer.
    assert r >= 1.0, (layer, r)
    leaf = layer.split('/')[-1]
    if leaf.startswith(('dense', 'head')):
      assert r <= 1.05, (layer, r)  # float64 SVD vs 500 power-iteration steps
    if leaf.startswith('bn'):
      assert r == 1.0, (layer, r)  # the same closed form in both modes
  print(name, {k: round(v, 4) for k, v in ratios.items()})


@pytest.mark.parametrize('name,extra', [('mlp', 1 / 0.25), ('cnn', 1.0)])
def test_chain_bound_is_the_product_of_layer_bounds(name, extra):
  # No residuals: below * head_norm is the product of the sown per-layer bounds, times the
  # input normalisation (1 / std, not sown) and max pooling (factor 1 for 2x2 / 2 windows).
  out = _numbers(name)
  cert = out['cert']
  product = extra * np.prod(list(out['cert_report'].values()), dtype=np.float64)
  np.testing.assert_allclose(float(cert.below * cert.head_norm), product, rtol=1e-5)


def test_cnn_conv_bn_certificates_against_dense_svd():
  # conv + batch norm (running statistics) is bounded as one operator, conv(x) * scale.
  _, variables, _ = _setup('cnn')
  params, stats = variables['params'], variables['batch_stats']
  report = _numbers('cnn')['cert_report']

  @jax.jit
  def matrices(k0, k1):
    def dense(kernel, hw):
      n = hw[0] * hw[1] * kernel.shape[2]
      eye = jnp.eye(n).reshape(n, *hw, kernel.shape[2])
      dn = ('NHWC', 'HWIO', 'NHWC')
      return jax.lax.conv_general_dilated(eye, kernel, (1, 1), 'SAME', dimension_numbers=dn)

    return dense(k0, (8, 8)), dense(k1, (4, 4))

  mats = matrices(params['conv0']['kernel'], params['conv1']['kernel'])
  for layer, mat in zip(['conv0', 'conv1'], mats, strict=True):
    gamma = np.asarray(params[layer]['bn']['scale'], np.float64)
    var = np.asarray(stats[layer]['bn']['var'], np.float64)
    mat = np.asarray(mat, np.float64) * (gamma / np.sqrt(var + 1e-5))
    exact = np.linalg.svd(mat.reshape(mat.shape[0], -1), compute_uv=False)[0]
    assert exact <= report[layer] <= 1.25 * exact, (layer, report[layer] / exact)
    np.testing.assert_allclose(_numbers('cnn')['converged_report'][layer], exact, rtol=1e-4)


def test_estimate_mode_updates_iterates_and_increases_monotonically():
  model, variables, shape = _setup('mlp')
  x = np.random.default_rng(3).uniform(0, 1, (4, *shape)).astype(np.float32)

  @jax.jit
  def step(variables):
    (_, b), updates = model.apply(
      variables, x, train=True, mode='estimate', mutable=['batch_stats', 'lipschitz']
    )
    return b.below * b.head_norm, {**variables, **updates}

  @jax.jit
  def converged(variables):
    b = model.apply(variables, x, mode='converged')[1]
    return b.below * b.head_norm

  v = variables
  estimates = []
  for i in range(25):
    est, new = step(v)
    estimates.append(float(est))
    if i == 0:
      changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), v['lipschitz'], new['lipschitz'])
      assert all(jax.tree.leaves(changed)), changed
    v = new
  estimates = np.array(estimates)
  target = float(converged(v))
  # Rayleigh quotients of power iteration never decrease (up to float32 rounding).
  assert np.all(np.diff(estimates) >= -1e-6 * estimates[1:]), np.diff(estimates)
  assert np.all(estimates <= target * (1 + 1e-5))
  assert target - estimates[-1] <= 0.1 * (target - estimates[0]), (estimates, target)
  # Without train=True the iterates are left alone even when the collection is mutable.
  _, frozen = jax.jit(
    lambda v: model.apply(v, x, train=False, mode='estimate', mutable=['lipschitz'])
  )(v)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, frozen['lipschitz'], v['lipschitz']))


def test_none_mode_needs_no_lipschitz_collection():
  model, variables, shape = _setup('cnn')
  assert set(variables) == {'params', 'batch_stats', 'lipschitz'}
  plain = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  x = np.random.default_rng(4).uniform(0, 1, (3, *shape)).astype(np.float32)
  logits_none = jax.jit(lambda v: model.apply(v, x, mode='none')[0])(plain)
  logits_cert = jax.jit(lambda v: model.apply(v, x, mode='certificate')[0])(plain)
  np.testing.assert_allclose(np.asarray(logits_none), np.asarray(logits_cert), rtol=1e-6)
  # The estimate mode does depend on it: without the iterates (and no rng to make them) it fails.
  with pytest.raises(flax.errors.ScopeCollectionNotFound, match='lipschitz'):
    jax.eval_shape(lambda v: model.apply(v, x, mode='estimate'), plain)


@pytest.mark.parametrize('name', CONFIGS)
def test_bad_inputs_raise(name):
  model, variables, shape = _setup(name)
  flat = jnp.zeros((2, int(np.prod(shape))))
  with pytest.raises(ValueError, match=r'\(2, ' + str(int(np.prod(shape))) + r'\)'):
    jax.eval_shape(lambda v: model.apply(v, flat, mode='none'), variables)
  x = jnp.zeros((2, *shape))
  with pytest.raises(ValueError, match='mode'):
    jax.eval_shape(lambda v: model.apply(v, x, mode='exact'), variables)


def test_get_model_and_depth_errors():
  with pytest.raises(ValueError, match='foo'):
    models.get_model('foo', 10)
  wrn = models.get_model('wrn', 10, depth=11)
  with pytest.raises(ValueError, match='6n'):
    jax.eval_shape(wrn.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert isinstance(models.get_model('cnn', 3), models.CNN)


@pytest.mark.parametrize('features,strides', [(4, (1, 1)), (6, (2, 2))])
def test_wide_block_adds_branch_and_shortcut_bounds(features, strides):
  block = models.WideBlock(features, strides)
  rng = np.random.default_rng(5)
  x = rng.uniform(0, 1, (2, 6, 6, 4)).astype(np.float32)
  lip = np.float32(0.7)
  shapes = jax.eval_shape(lambda k: block.init(k, x, lip, mode='none'), jax.random.key(1))
  variables = random_variables(shapes, rng)

  @jax.jit
  def run(variables, x, y):
    (out, bound), rep = block.apply(variables, x, lip, mode='certificate', mutable=['lip_report'])
    return out, bound, rep['lip_report'], block.apply(variables, y, lip, mode='none')[0]

  y = x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
  out, bound, rep, out_y = run(variables, x, y)
  rep = _report(rep)
  lip_o = lip * np.float32(rep['bn1'])
  branch = lip_o * np.float32(rep['conv1']) * np.float32(rep['conv2'])
  if strides == (1, 1):
    assert 'shortcut' not in rep
    shortcut = lip  # identity shortcut keeps the incoming bound
  else:
    shortcut = lip_o * np.float32(rep['shortcut'])
  np.testing.assert_allclose(float(bound), branch + shortcut, rtol=1e-6)
  # The block itself is (bound / lip)-Lipschitz: check it on one empirical pair.
  ratio = np.linalg.norm(np.asarray(out - out_y)) / np.linalg.norm(x - y)
  assert ratio <= float(bound) / lip


def test_pool_helpers_multiply_the_bound():
  x = jnp.zeros((1, 8, 8, 2))
  _, lip = models.max_pool(x, 2.0, (3, 3), (1, 1))
  assert float(lip) == 6.0
  _, lip = models.avg_pool(x, 2.0)
  assert float(lip) == 1.0
  y, lip = models.global_avg_pool(x, 2.0)
  assert y.shape == (1, 2) and float(lip) == pytest.approx(2.0 / 8.0)
