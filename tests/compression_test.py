"""Gradient compression: conservation, the VGC rule against a numpy reference, wire format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsuzuku_jax.vgc import compression

METHOD_KW = {
  'dense': {},
  'vgc': dict(alpha=1.0, capacity=0.3),
  'hybrid': dict(alpha=1.0, tau=0.3, capacity=0.3),
  'strom': dict(tau=0.5, capacity=0.2),
  'topk': dict(density=0.1),
  'topk_q': dict(density=0.1, quantize=True),
  'vgc_raw': dict(alpha=0.5, capacity=0.05, quantize=False),
}


def _tree(key, scale=1.0):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    'a': {
      'kernel': scale * jax.random.normal(k1, (17, 9)),
      'bias': scale * jax.random.normal(k2, (9,)),
    },
    'b': scale * jax.random.normal(k3, (5, 4, 3)),
  }


def _decoded(messages, like):
  def one(m, ref):
    if isinstance(m, compression.SparseMessage):
      return compression.decode(m, ref.size).reshape(ref.shape)
    return m

  return jax.tree.map(
    one, messages, like, is_leaf=lambda x: isinstance(x, compression.SparseMessage)
  )


@pytest.mark.parametrize('name', sorted(METHOD_KW))
def test_nothing_is_lost(name, key):
  """decoded sent + new residual == old residual + gradient, every step, every method."""
  method = name.split('_')[0]
  comp = compression.make(method, **METHOD_KW[name])
  params = _tree(key)
  state = comp.init(params)
  update = jax.jit(comp.update)
  saw_overflow = False
  for t in range(6):
    g = _tree(jax.random.fold_in(key, t), scale=0.3 + t)
    s = jax.tree.map(lambda a: 0.1 * jnp.square(a) + 0.01, g)
    msgs, new, stats = update(g, state, s if comp.needs_variance else None)
    lhs = jax.tree.map(jnp.add, _decoded(msgs, params), new.residual)
    rhs = jax.tree.map(jnp.add, state.residual, g)
    for a, b in zip(jax.tree.leaves(lhs), jax.tree.leaves(rhs), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    total = sum(p.size for p in jax.tree.leaves(params))
    assert int(stats['elements']) == total
    assert 0 <= int(stats['sent']) <= total
    saw_overflow |= int(stats['overflow']) > 0
    state = new
  if name == 'vgc_raw':
    assert saw_overflow  # capacity 5%: the bound is hit and counted


def _numpy_vgc(r, v, g, s, alpha, zeta):
  """Independent reference of one VGC step with unlimited capacity and no quantisation."""
  r = r + g
  v = v + s
  send = (r * r > alpha * v) & (r != 0)
  sent = np.where(send, r, 0.0)
  return sent, np.where(send, 0.0, r), np.where(send, 0.0, zeta * v)


def test_vgc_rule_matches_numpy_reference(key):
  comp = compression.make('vgc', alpha=2.0, zeta=0.9, capacity=1.0, quantize=False)
  params = {'w': jnp.zeros((200,))}
  state = comp.init(params)
  r = v = np.zeros(200)
  mean = np.linspace(-1, 1, 200)
  for t in range(8):
    g = mean + np.asarray(jax.random.normal(jax.random.fold_in(key, t), (200,)))
    s = np.full(200, 1.0)
    msgs, state, stats = comp.update(
      {'w': jnp.asarray(g, jnp.float32)}, state, {'w': jnp.ones(200)}
    )
    sent, r, v = _numpy_vgc(r, v, g, s, 2.0, 0.9)
    np.testing.assert_allclose(compression.decode(msgs['w'], 200), sent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.residual['w'], r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.variance['w'], v, rtol=1e-5, atol=1e-5)
    assert int(stats['sent']) == int(np.sum(sent != 0))


def test_quantisation_rounds_down_to_powers_of_two(key):
  mag = jnp.abs(jax.random.normal(key, (1000,))) * 10.0 ** jax.random.uniform(
    key, (1000,), minval=-3, maxval=0
  )
  scale = jnp.max(mag)
  e, ok = compression.quantize_magnitude(mag, scale)
  q = scale * 2.0 ** -e.astype(jnp.float32)
  assert np.all(np.asarray(q[ok]) <= np.asarray(mag[ok]))
  assert np.all(np.asarray(mag[ok]) < 2 * np.asarray(q[ok]))
  np.testing.assert_array_equal(np.asarray(ok), np.asarray(mag >= scale / 128))


def test_wire_format_round_trip():
  index = jnp.array([0, 5, 2**28 - 1], jnp.int32)
  code = jnp.array([0, 8 + 3, 7])
  words = compression._pack(index, code)
  assert words.dtype == jnp.uint32
  np.testing.assert_array_equal(compression.unpack_index(words), index)
  np.testing.assert_array_equal(compression.decode_values(words, 4.0), [4.0, -0.5, 4.0 / 128])


def test_strom_sends_plus_minus_tau_and_topk_the_largest(key):
  g = {'w': jnp.array([0.1, -0.7, 0.4, 2.0, -0.05])}
  comp = compression.make('strom', tau=0.3, capacity=1.0)
  msgs, state, _ = comp.update(g, comp.init(g), None)
  np.testing.assert_allclose(compression.decode(msgs['w'], 5), [0, -0.3, 0.3, 0.3, 0])
  np.testing.assert_allclose(state.residual['w'], [0.1, -0.4, 0.1, 1.7, -0.05], atol=1e-7)
  top = compression.make('topk', density=0.4)
  msgs, state, _ = top.update(g, top.init(g), None)
  np.testing.assert_allclose(compression.decode(msgs['w'], 5), [0, -0.7, 0, 2.0, 0])
  assert msgs['w'].values.dtype == jnp.float32


def test_capacity_overflow_is_counted_and_rotates(key):
  comp = compression.make('vgc', alpha=0.0, capacity=0.1, quantize=False)
  g = {'w': jnp.ones((100,))}
  state = comp.init(g)
  firsts = set()
  for _ in range(3):
    msgs, state, stats = comp.update({'w': jnp.zeros((100,)) + 1e-3}, state, {'w': jnp.zeros(100)})
    assert int(stats['sent']) == 10
    assert int(stats['overflow']) == 90
    firsts.add(int(compression.unpack_index(msgs['w'].words)[0]))
  assert len(firsts) == 3  # a different starting offset each step: no region starves


def test_bytes_accounting():
  comp = compression.make('vgc', alpha=0.0, capacity=0.5)
  g = {'w': jnp.arange(1.0, 11.0)}
  _, _, stats = comp.update(g, comp.init(g), {'w': jnp.zeros(10)})
  assert int(stats['dense_bytes']) == 40
  assert int(stats['static_bytes']) == 5 * 4 + 4  # 5 slots of one word + the scale
  assert int(stats['ideal_bytes']) == int(stats['sent']) * 4 + 8
  raw = compression.make('topk', density=0.2)
  _, _, stats = raw.update(g, raw.init(g), None)
  assert int(stats['static_bytes']) == 2 * 8 + 4


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(method='vgc', alpha=-1.0), 'alpha'),
    (dict(method='vgc', zeta=0.0), 'zeta'),
    (dict(method='vgc', zeta=1.5), 'zeta'),
    (dict(method='vgc', capacity=0.0), 'capacity'),
    (dict(method='vgc', capacity=2.0), 'capacity'),
    (dict(method='strom', tau=0.0), 'tau'),
    (dict(method='topk', density=0.0), 'density'),
    (dict(method='sparse'), 'method'),
  ],
)
def test_bad_parameters_fail_early(kwargs, match):
  with pytest.raises(ValueError, match=match):
    compression.make(**kwargs)


def test_vgc_without_variance_fails():
  comp = compression.make('vgc')
  g = {'w': jnp.ones(3)}
  with pytest.raises(ValueError, match='variance'):
    comp.update(g, comp.init(g), None)


def test_compaction_matches_numpy_reference_with_wraparound(key):
  rng = np.random.default_rng(0)
  compact = jax.jit(compression._compact, static_argnums=1)
  d = 97
  for t in range(60):
    mask = rng.random(d) < rng.random()
    cap = (1, 7, 40, d)[t % 4]
    offset = int(rng.integers(0, d))
    order = np.concatenate([np.arange(offset, d), np.arange(offset)])
    want = [i for i in order if mask[i]][:cap]
    want += [d] * (cap - len(want))
    got = compact(jnp.asarray(mask), cap, jnp.int32(offset))
    np.testing.assert_array_equal(got, want)


def test_hybrid_needs_both_tests_and_v_resets_only_where_sent():
  # r^2 / v: [8, 8, 0.5, 8]; |r|: [1, 0.1, 1, 1]; capacity 2 slots of 4.
  g = {'w': jnp.array([1.0, 0.1, 1.0, -1.0])}
  s = {'w': jnp.array([0.125, 0.00125, 2.0, 0.125])}
  comp = compression.make('hybrid', alpha=2.0, zeta=0.5, tau=0.5, capacity=0.5)
  msgs, state, stats = comp.update(g, comp.init(g), s)
  sent = np.asarray(compression.decode(msgs['w'], 4))
  np.testing.assert_allclose(sent, [1.0, 0, 0, -1.0])  # index 1 fails tau, index 2 the variance
  np.testing.assert_allclose(state.variance['w'], [0, 0.5 * 0.00125, 1.0, 0])
  assert int(stats['overflow']) == 0
  comp = compression.make('vgc', alpha=2.0, zeta=0.5, capacity=0.25)  # 1 slot: 2 overflow
  msgs, state, stats = comp.update(g, comp.init(g), s)
  assert int(stats['sent']) == 1 and int(stats['overflow']) == 2
  # Only the sent element is reset; the overflowed ones (and index 2) decay by zeta.
  expect = 0.5 * np.asarray(s['w'])
  expect[int(compression.unpack_index(msgs['w'].words)[0])] = 0.0
  np.testing.assert_allclose(state.variance['w'], expect, rtol=1e-6)


def test_mismatched_shapes_fail_with_the_parameter_named():
  comp = compression.make('vgc')
  params = {'a': jnp.zeros((17, 9))}
  with pytest.raises(ValueError, match=r"gradient \['a'\] has shape \(9,\)"):
    comp.update({'a': jnp.zeros(9)}, comp.init(params), {'a': jnp.zeros((17, 9))})
