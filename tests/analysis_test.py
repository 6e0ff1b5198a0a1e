"""The jaxpr Lipschitz analysis on plain Flax models: exact on linear maps (against a float64
dense reference), sound on a zoo of nonlinear ones (against the largest Jacobian norms found on
many inputs, and a PGD attack inside the certified radii), clear refusals of what it cannot
bound."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsuzuku_jax import attacks, lmt
from tsuzuku_jax.lmt import analysis, bounds

SHAPE = (8, 8, 2)
K = 5


class _Mlp(nn.Module):
  act: bool = True
  fn: object = nn.relu

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for w in (32, 16):
      x = nn.Dense(w)(x)
      x = self.fn(x) if self.act else x
    return nn.Dense(K)(x)


def _mish(x):
  return x * jnp.tanh(jax.nn.softplus(x))


class _Cnn(nn.Module):
  """Strided convs, overlapping max pooling, input normalisation by constants."""

  act: bool = True

  @nn.compact
  def __call__(self, x):
    x = (x - jnp.array([0.4, 0.6])) / jnp.array([0.2, 0.3])
    x = nn.Conv(6, (3, 3), strides=(2, 2))(x)
    if self.act:
      x = nn.max_pool(nn.relu(x), (3, 3), (1, 1), padding='SAME')
    x = nn.Conv(8, (3, 3), padding='VALID')(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(K)(x)


class _BnResNet(nn.Module):
  """Conv + inference batch norm, a residual block with a 1x1 projection, average pooling."""

  act: bool = True

  @nn.compact
  def __call__(self, x):
    act = nn.relu if self.act else (lambda z: z)
    bn = functools.partial(nn.BatchNorm, use_running_average=True)
    x = act(bn()(nn.Conv(4, (3, 3))(x)))
    y = act(bn()(nn.Conv(6, (3, 3), strides=(2, 2))(x)))
    y = bn()(nn.Conv(6, (3, 3))(y))
    x = act(y + nn.Conv(6, (1, 1), strides=(2, 2))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(K)(x.reshape(x.shape[0], -1))


class _Depthwise(nn.Module):
  act: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.Conv(4, (3, 3), feature_group_count=4, kernel_dilation=(2, 2))(x)  # depthwise
    x = nn.gelu(x, approximate=False) if self.act else x
    x = nn.Conv(6, (1, 1))(x)  # pointwise
    x = nn.tanh(x) if self.act else x
    return nn.Dense(K)(jnp.mean(x, axis=(1, 2)))


class _MinMax(nn.Module):
  act: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    a, b = x[:, :8], x[:, 8:]
    x = jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], -1) if self.act else x
    x = nn.leaky_relu(nn.Dense(12)(x), 0.2) if self.act else nn.Dense(12)(x)
    return nn.Dense(K)(nn.sigmoid(x) if self.act else x)


ZOO = {
  'mlp': _Mlp,
  'cnn': _Cnn,
  'bn_resnet': _BnResNet,
  'depthwise': _Depthwise,
  'minmax': _MinMax,
  'mlp_gelu_tanh': functools.partial(_Mlp, fn=nn.gelu),
  'mlp_silu': functools.partial(_Mlp, fn=nn.silu),
  'mlp_mish': functools.partial(_Mlp, fn=_mish),
}


@functools.cache
def _model(name, act):
  model = ZOO[name](act=act)
  v = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
  if 'batch_stats' in v:  # non-trivial running statistics: means near 0, variances 0.3..2
    flat = jax.tree_util.tree_flatten_with_path(v['batch_stats'])
    keys = jax.random.split(jax.random.key(1), len(flat[0]))
    stats = [
      jax.random.uniform(k, a.shape, minval=0.3, maxval=2.0)
      if 'var' in jax.tree_util.keystr(p)
      else jax.random.uniform(k, a.shape, minval=-0.1, maxval=0.1)
      for k, (p, a) in zip(keys, flat[0], strict=True)
    ]
    v = {**v, 'batch_stats': jax.tree.unflatten(flat[1], stats)}
  return model, v


def _jacobians(model, v, xs):
  j = jax.jit(jax.vmap(jax.jacfwd(lambda x: model.apply(v, x[None])[0])))(xs)
  return np.asarray(j, np.float64).reshape(len(xs), K, -1)


@pytest.mark.parametrize('name', list(ZOO))
def test_linear_variants_are_exact_against_a_dense_float64_reference(name):
  model, v = _model(name, False)
  cert = analysis.certificate(model.apply, v, SHAPE)
  # The affine map's matrix, in float64 from float32 parameters.
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v)
    x0 = jnp.zeros((1, *SHAPE), jnp.float64)
    jac = np.asarray(jax.jacfwd(lambda x: model.apply(v64, x))(x0), np.float64).reshape(K, -1)
  exact = np.linalg.norm(jac, 2)
  assert exact <= cert.lipschitz <= exact * (1 + 1e-5)
  diff = np.linalg.norm(jac[:, None] - jac[None], axis=-1)
  assert np.all(diff <= cert.pairwise) and np.all(cert.pairwise <= diff * (1 + 1e-5) + 1e-12)
  # The structured (product) bound, used when a segment is too large to materialise, is sound.
  loose = analysis.certificate(model.apply, v, SHAPE, exact_max_entries=0)
  assert loose.lipschitz >= cert.lipschitz * (1 - 1e-6)


@pytest.mark.parametrize('name', list(ZOO))
def test_certificate_bounds_every_jacobian_found(name):
  model, v = _model(name, True)
  cert = analysis.certificate(model.apply, v, SHAPE)
  xs = jax.random.uniform(jax.random.key(2), (96, *SHAPE))
  jac = _jacobians(model, v, xs)
  # Gradient ascent on the largest singular value from the 8 worst points.
  worst = xs[np.argsort([-np.linalg.norm(j, 2) for j in jac])[:8]]
  top = lambda x: jnp.linalg.norm(
    jax.jacfwd(lambda z: model.apply(v, z[None])[0])(x).reshape(K, -1), 2
  )  # noqa: E731, E501
  step = jax.jit(jax.vmap(lambda x: x + 0.05 * jax.grad(top)(x)))
  for _ in range(10):
    worst = step(worst)
  jac = np.concatenate([jac, _jacobians(model, v, worst)])
  found = max(np.linalg.norm(j, 2) for j in jac)
  assert found <= cert.lipschitz, (found, cert.lipschitz)
  pair = np.linalg.norm(jac[:, :, None] - jac[:, None], axis=-1).max(0)
  assert np.all(pair <= cert.pairwise * (1 + 1e-6)), np.max(pair - cert.pairwise)
  assert {s.exact for s in cert.segments} == {True}  # all small enough for exact norms


def test_certified_radii_survive_pgd_at_0999():
  model, v = _model('bn_resnet', True)
  cert = analysis.certificate(model.apply, v, SHAPE)
  xs = jax.random.uniform(jax.random.key(3), (64, *SHAPE))
  pred, radius = lmt.certify(model.apply, v, xs, cert)
  logits_fn = jax.jit(lambda x: model.apply(v, x))
  ref_pred, ref_radius = lmt.certified_radius(logits_fn(xs), jnp.asarray(cert.pairwise))
  np.testing.assert_array_equal(pred, ref_pred)
  np.testing.assert_allclose(radius, ref_radius, rtol=1e-4)  # two XLA graphs of the logits
  assert float(jnp.min(radius)) > 0
  broken = attacks.count_violations(
    logits_fn, xs, pred, 0.999 * radius, radius > 0, key=jax.random.key(4), steps=50, restarts=4
  )
  assert int(broken) == 0
  # A certificate 3x too small is caught by the same attack (the check can fail).
  small = lmt.certified_radius(logits_fn(xs), jnp.asarray(cert.pairwise) / 200)[1]
  broken = attacks.count_violations(
    logits_fn, xs, pred, small, small > 0, key=jax.random.key(4), steps=50, restarts=4
  )
  assert int(broken) > 0


def test_only_a_certificate_certifies():
  model, v = _model('mlp', True)
  with pytest.raises(TypeError, match='Certificate'):
    lmt.certify(model.apply, v, jnp.zeros((2, *SHAPE)), np.ones((K, K)))
  est = lmt.Estimate(jnp.ones((K, K)), jnp.ones(()))
  with pytest.raises(TypeError, match='Certificate'):
    lmt.certify(model.apply, v, jnp.zeros((2, *SHAPE)), est)


class _LayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x.reshape(x.shape[0], -1))
    x = nn.LayerNorm()(x)
    return nn.Dense(K)(x)


class _TrainBn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=False)(x)
    return nn.Dense(K)(x.reshape(x.shape[0], -1))


class _Square(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x.reshape(x.shape[0], -1))
    return nn.Dense(K)(x * jnp.tanh(x) + 1.0)


class _Softmax(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jax.nn.softmax(nn.Dense(K)(x.reshape(x.shape[0], -1)))


@pytest.mark.parametrize(
  'module, apply, message',
  [
    (_Square, None, r'mul on an input-dependent value at .*\(_Square.__call__\).*product.*known'),
    (
      _LayerNorm,
      None,
      r'square on an input-dependent value at .*_test.py:\d+ \(_LayerNorm.__call__\).*layer',
    ),
    (_TrainBn, 'mutable', r'_test.py:\d+ \(_TrainBn.__call__\).*inference-mode batch norm'),
    (
      _Softmax,
      None,
      r'exp on an input-dependent value at .*_test.py:\d+ \(_Softmax.__call__\).*logits',
    ),
  ],
)
def test_unsupported_operations_name_the_primitive_and_line(module, apply, message):
  model = module()
  v = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
  fn = model.apply
  if apply == 'mutable':
    fn = lambda v, x: model.apply(v, x, mutable=['batch_stats'])[0]  # noqa: E731
  with pytest.raises(analysis.UnsupportedOperation, match=message):
    analysis.certificate(fn, v, SHAPE)


class _ConvBn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True)(nn.Conv(3, (3, 3), strides=(2, 2))(x))
    return nn.Dense(K)(nn.relu(x).reshape(x.shape[0], -1))


def test_product_bound_folds_batch_norm_into_the_conv():
  model = _ConvBn()
  v = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
  stats = v['batch_stats']['BatchNorm_0']
  var = jnp.array([0.01, 1.0, 4.0])  # very different channel scales: folding matters
  v = {**v, 'batch_stats': {'BatchNorm_0': {**stats, 'var': var}}}
  loose = analysis.certificate(model.apply, v, SHAPE, exact_max_entries=0)
  p = v['params']
  scale = p['BatchNorm_0']['scale'] / jnp.sqrt(var + 1e-5)
  kernel = p['Conv_0']['kernel']
  # The segment before the relu: conv x BN scale as one operator (bias and shift drop out);
  # the head after it is always bounded exactly.
  fused = float(bounds.conv_certificate(kernel, (8, 8), (2, 2), 'SAME', scale))
  dense = np.linalg.norm(np.asarray(p['Dense_0']['kernel'], np.float64), 2)
  unfused = float(bounds.conv_certificate(kernel, (8, 8), (2, 2), 'SAME')) * float(
    jnp.max(jnp.abs(scale))
  )
  assert loose.lipschitz == pytest.approx(fused * dense, rel=1e-5)
  assert fused < 0.9 * unfused


class _LinearResidual(nn.Module):
  """LiResNet blocks relu(x + conv(x)) and relu(x - conv(x)), a dense one x + dense(x), a head."""

  scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.variance_scaling(self.scale, 'fan_in', 'normal')
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.relu(x + nn.Conv(6, (3, 3), kernel_init=init, name='plus')(x))
    x = nn.relu(x - nn.Conv(6, (3, 3), kernel_init=init, name='minus')(x))
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    x = nn.relu(x + nn.Dense(32, kernel_init=init, name='dense')(x))
    return nn.Dense(K)(x)


@pytest.mark.parametrize('scale', [0.1, 2.0])
def test_linear_residual_block_is_bounded_as_one_kernel(scale):
  # x + conv(x) as the conv whose kernel has I at its centre tap: ||I + W|| (within 1.01 of
  # the exact norm), where the triangle inequality gives 1 + ||W||; x - conv(x) as I - W (the
  # sign kept); the same for a square dense layer.
  model = _LinearResidual(scale)
  v = model.init(jax.random.key(1), jnp.zeros((1, *SHAPE)))
  cert = analysis.certificate(model.apply, v, SHAPE, exact_max_entries=0)
  p = {k: np.asarray(w['kernel'], np.float64) for k, w in v['params'].items()}
  conv = lambda w: float(bounds.conv_certificate(w, (8, 8), (1, 1), 'SAME'))  # noqa: E731
  blocks = {s.in_shape: [] for s in cert.segments}
  for s in cert.segments:
    if s.in_shape == s.out_shape:
      blocks[s.in_shape].append(s)
  (a, b), (dense,) = blocks[(1, 8, 8, 6)], blocks[(1, 32)]
  want_plus = np.eye(6) + p['plus'][1, 1]  # the centre taps: I + W_plus and I - W_minus
  plus, minus = (a, b) if np.allclose(a.linear.kernel[1][1, 1], want_plus) else (b, a)
  np.testing.assert_allclose(plus.linear.kernel[1][1, 1], want_plus, rtol=1e-6)
  np.testing.assert_allclose(minus.linear.kernel[1][1, 1], np.eye(6) - p['minus'][1, 1], rtol=1e-6)
  triangle = {
    'plus': 1 + conv(p['plus']),
    'minus': 1 + conv(p['minus']),
    'dense': 1 + np.linalg.norm(p['dense'], 2),
  }
  for name, seg in (('plus', plus), ('minus', minus), ('dense', dense)):
    exact = analysis.exact_norm(seg.linear)
    assert not seg.exact and exact <= seg.bound <= 1.01 * exact, (name, seg.bound, exact)
    assert seg.bound < triangle[name] / 1.02, (name, seg.bound, triangle[name])


class _ConvPool(nn.Module):
  pad: str = 'SAME'

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.Conv(6, (3, 3), padding=self.pad, name='conv')(x), (2, 2), (2, 2))
    return nn.Dense(K)(nn.relu(x).reshape(x.shape[0], -1))


@pytest.mark.parametrize(
  'pad,shape', [('SAME', (8, 8, 3)), ('VALID', (8, 8, 3)), ('VALID', (9, 9, 3))]
)
def test_average_pool_folds_into_the_conv_before_it(pad, shape):
  # avg_pool(conv(x)) as one strided conv (kernel * box): within 1.01 of the exact norm in the
  # product bound, where ||conv|| / 2 is 1.26x; a pooling that drops a row is not folded
  # (still sound).
  model = _ConvPool(pad)
  v = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
  cert = analysis.certificate(model.apply, v, shape, exact_max_entries=0)
  (seg,) = [s for s in cert.segments if s.in_shape == (1, *shape)]
  exact = analysis.exact_norm(seg.linear)
  kernel = np.asarray(v['params']['conv']['kernel'], np.float64)
  unfolded = float(bounds.conv_certificate(kernel, shape[:2], (1, 1), pad)) / 2
  assert exact <= seg.bound
  if shape[0] % 2 == 0:
    assert seg.bound <= 1.01 * exact and unfolded > 1.1 * exact, (seg.bound, unfolded, exact)
  else:
    assert seg.bound == pytest.approx(unfolded, rel=1e-5)
