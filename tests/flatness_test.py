"""Hessian machinery against dense references (float64), known Hessians and exact facts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tsuzuku_jax import checks, flatness


def _mlp_loss(key, dtype=jnp.float64, widths=(5, 7, 3)):
  """A tiny ReLU MLP with cross-entropy on fixed random data, and its parameters."""
  keys = jax.random.split(key, 2 * len(widths))
  params = {
    f'l{i}': {
      'w': jax.random.normal(keys[2 * i], (a, b), dtype) / np.sqrt(a),
      'b': 0.1 * jax.random.normal(keys[2 * i + 1], (b,), dtype),
    }
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
  }
  x = jax.random.normal(jax.random.fold_in(key, 99), (16, widths[0]), dtype)
  y = jax.random.randint(jax.random.fold_in(key, 98), (16,), 0, widths[-1])

  def apply(p, x):
    n = len(p)
    for i in range(n):
      x = x @ p[f'l{i}']['w'] + p[f'l{i}']['b']
      if i < n - 1:
        x = jax.nn.relu(x)
    return x

  def loss(p):
    logits = apply(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))

  return loss, params, apply, x


def test_hvp_and_exact_diagonal_match_the_dense_hessian(key):
  with jax.enable_x64(True):
    loss, params, _, _ = _mlp_loss(key)
    h = flatness.exact_hessian(loss, params)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.fold_in(key, 1), flat.shape, jnp.float64)
    hv = ravel_pytree(flatness.hvp(loss, params, unravel(v)))[0]
    np.testing.assert_allclose(hv, h @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
      ravel_pytree(flatness.hessian_op(loss, params)(unravel(v)))[0], h @ v, rtol=1e-10, atol=1e-12
    )
    diag = ravel_pytree(flatness.exact_diagonal(flatness.hessian_op(loss, params), params, 7))[0]
    np.testing.assert_allclose(diag, jnp.diag(h), rtol=1e-10, atol=1e-12)
    # The normalized operator is diag(theta) H diag(theta).
    nd = ravel_pytree(flatness.exact_diagonal(flatness.normalized_op(loss, params), params))[0]
    np.testing.assert_allclose(nd, flat**2 * jnp.diag(h), rtol=1e-10, atol=1e-12)


def test_hutchinson_is_unbiased_with_the_predicted_variance(key):
  with jax.enable_x64(True):
    n = 12
    m = jax.random.normal(key, (n, n), jnp.float64)
    a = m @ m.T / n + jnp.diag(jnp.arange(n, dtype=jnp.float64))
    like = {'x': jnp.zeros(6, jnp.float64), 'y': jnp.zeros((2, 3), jnp.float64)}
    _, unravel = ravel_pytree(like)
    op = lambda v: unravel(a @ ravel_pytree(v)[0])  # noqa: E731
    # A quadratic loss 0.5 x^T A x has Hessian A: the HVP path agrees with the operator.
    quad = lambda p: 0.5 * ravel_pytree(p)[0] @ a @ ravel_pytree(p)[0]  # noqa: E731
    np.testing.assert_allclose(flatness.exact_hessian(quad, like), a, rtol=1e-12)
    k = 4000
    est = flatness.hutchinson_trace(
      op, like, key=jax.random.fold_in(key, 1), num_probes=k, chunk=64
    )
    var = 2 * (jnp.sum(a**2) - jnp.sum(jnp.diag(a) ** 2))
    assert abs(est.value - jnp.trace(a)) < 4 * jnp.sqrt(var / k)
    assert float(jnp.var(est.samples, ddof=1)) == pytest.approx(float(var), rel=0.1)
    assert float(est.stderr) == pytest.approx(float(jnp.sqrt(var / k)), rel=0.1)
    d = flatness.hutchinson_diagonal(
      op, like, key=jax.random.fold_in(key, 2), num_probes=k, chunk=64
    )
    mean, se = ravel_pytree(d.value)[0], ravel_pytree(d.stderr)[0]
    var_d = jnp.sum(a**2, 1) - jnp.diag(a) ** 2
    assert np.all(np.abs(mean - jnp.diag(a)) < 4.5 * jnp.sqrt(var_d / k))
    np.testing.assert_allclose(se, jnp.sqrt(var_d / k), rtol=0.15)


def test_probe_chunking_does_not_change_the_estimate(key):
  with jax.enable_x64(True):
    loss, params, _, _ = _mlp_loss(key)
    op = flatness.hessian_op(loss, params)
    a = flatness.hutchinson_trace(op, params, key=key, num_probes=24, chunk=8)
    b = flatness.hutchinson_trace(op, params, key=key, num_probes=24, chunk=8)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.samples.shape == (24,)
    c = flatness.hutchinson_trace(
      op, params, key=key, num_probes=20, chunk=8
    )  # last chunk partly used
    np.testing.assert_array_equal(c.samples, a.samples[:20])


def test_lanczos_recovers_the_spectrum(key):
  with jax.enable_x64(True):
    loss, params, _, _ = _mlp_loss(key)
    h = flatness.exact_hessian(loss, params)
    n = h.shape[0]
    ev = jnp.sort(jnp.linalg.eigvalsh(h))[::-1]
    op = flatness.hessian_op(loss, params)
    top = flatness.top_eigenvalues(op, params, key=key, k=3, num_iters=n)
    np.testing.assert_allclose(top, ev[:3], rtol=1e-8, atol=1e-10)
    res = flatness.lanczos(op, params, key=key, num_iters=20)
    np.testing.assert_allclose(res.basis @ res.basis.T, jnp.eye(20), atol=1e-10)
    # A few iterations already find the top eigenvalue closely (it is well separated here).
    few = flatness.top_eigenvalues(op, params, key=key, k=1, num_iters=30)
    assert float(few[0]) == pytest.approx(float(ev[0]), rel=1e-6)


def test_bad_input_is_named(key):
  loss, params, _, _ = _mlp_loss(key, jnp.float32)
  bad = jax.tree.map(lambda x: x, params)
  bad['l1']['w'] = bad['l1']['w'].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"\['l1'\]\['w'\].*non-finite"):
    checks.check_params(bad)
  with pytest.raises(ValueError, match='dtype'):
    checks.check_params({'w': jnp.zeros(3, jnp.int32)})
  op = flatness.hessian_op(loss, params)
  with pytest.raises(ValueError, match='num_probes'):
    flatness.hutchinson_trace(op, params, key=key, num_probes=0)
  with pytest.raises(ValueError, match='num_iters'):
    flatness.lanczos(op, params, key=key, num_iters=10**6)
  with pytest.raises(ValueError, match='k'):
    flatness.top_eigenvalues(op, params, key=key, k=0)


def test_gauss_newton_diagonal_matches_dense_and_equals_h_for_a_linear_model(key):
  with jax.enable_x64(True):
    loss, params, apply, x = _mlp_loss(key)
    flat, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda f: apply(unravel(f), x))(flat)  # (B, K, n)
    p = jax.nn.softmax(apply(params, x))
    h_out = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    g = jnp.einsum('bkn,bkl,blm->nm', jac, h_out, jac) / x.shape[0]
    got = ravel_pytree(flatness.gauss_newton_diagonal(apply, params, x, chunk=5))[0]
    np.testing.assert_allclose(got, jnp.diag(g), rtol=1e-10, atol=1e-14)
    assert np.all(got >= 0)
    # Softmax regression is linear in its parameters: the Gauss-Newton matrix is the Hessian.
    lin_loss, lin_params, lin_apply, lx = _mlp_loss(key, widths=(5, 3))
    h = flatness.exact_hessian(lin_loss, lin_params)
    gn = ravel_pytree(flatness.gauss_newton_diagonal(lin_apply, lin_params, lx))[0]
    np.testing.assert_allclose(gn, jnp.diag(h), rtol=1e-10, atol=1e-14)


def _rescale(params, key, layerwise=None):
  """A function-preserving rescaling of the ReLU MLP: layer-wise (alpha) or neuron-wise."""
  out = jax.tree.map(lambda x: x, params)
  for i in range(len(params) - 1):
    h = params[f'l{i}']['b'].shape[0]
    if layerwise is not None:
      d = jnp.full(h, layerwise, params[f'l{i}']['b'].dtype)
    else:
      d = jnp.exp(jax.random.uniform(jax.random.fold_in(key, i), (h,), minval=-4.6, maxval=4.6))
    out[f'l{i}'] = {'w': out[f'l{i}']['w'] * d, 'b': out[f'l{i}']['b'] * d}
    out[f'l{i + 1}'] = {'w': out[f'l{i + 1}']['w'] / d[:, None], 'b': out[f'l{i + 1}']['b']}
  return out


@pytest.mark.parametrize('layerwise', [None, 10.0])
def test_normalized_measures_are_invariant_to_rescaling(key, layerwise):
  with jax.enable_x64(True):
    _, params, apply, x = _mlp_loss(key)
    y = jax.random.randint(jax.random.fold_in(key, 98), (16,), 0, 3)

    def loss_of(p):
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(apply(p, x)), y[:, None], -1))

    scaled = _rescale(params, jax.random.fold_in(key, 3), layerwise)
    np.testing.assert_allclose(apply(scaled, x), apply(params, x), rtol=1e-12, atol=1e-12)
    probe = jax.random.fold_in(key, 4)
    for p_ in (params, scaled):
      checks.check_params(p_)
    kappa = [
      ravel_pytree(flatness.normalized_diagonal(loss_of, p_, method='exact'))[0]
      for p_ in (params, scaled)
    ]
    np.testing.assert_allclose(kappa[1], kappa[0], rtol=1e-10, atol=1e-14)
    hut = [
      flatness.normalized_diagonal(loss_of, p_, key=probe, num_probes=8) for p_ in (params, scaled)
    ]
    np.testing.assert_allclose(
      ravel_pytree(hut[1])[0], ravel_pytree(hut[0])[0], rtol=1e-10, atol=1e-14
    )
    gn = [
      ravel_pytree(
        flatness.normalized_diagonal(loss_of, p_, method='gauss_newton', logits_fn=apply, images=x)
      )[0]
      for p_ in (params, scaled)
    ]
    np.testing.assert_allclose(gn[1], gn[0], rtol=1e-10, atol=1e-14)
    tr = [
      flatness.hutchinson_trace(
        flatness.normalized_op(loss_of, p_), p_, key=probe, num_probes=8
      ).value
      for p_ in (params, scaled)
    ]
    assert float(tr[1]) == pytest.approx(float(tr[0]), rel=1e-10)
    so = [flatness.sigma_optimised(k, 1e-3) for k in (gn[0], gn[1])]
    assert float(so[1]) == pytest.approx(float(so[0]), rel=1e-10)
    # The raw Hessian trace is not invariant: it changes by orders of magnitude.
    raw = [jnp.trace(flatness.exact_hessian(loss_of, p_)) for p_ in (params, scaled)]
    assert max(raw[1] / raw[0], raw[0] / raw[1]) > 10


def test_sigma_optimised_matches_a_numerical_minimum():
  from scipy.optimize import minimize_scalar

  lam = 0.3
  kappa = np.array([1e-4, 0.02, 0.5, 3.0, 40.0])
  total = 0.0
  for k in kappa:
    f = lambda t, k=k: 0.5 * np.exp(t) * k + 0.5 * lam * np.log1p(np.exp(-t))  # t = ln u
    total += minimize_scalar(f, bounds=(-30, 30), method='bounded', options={'xatol': 1e-12}).fun
  got = float(flatness.sigma_optimised({'k': jnp.asarray(kappa)}, lam))
  assert got == pytest.approx(total, rel=1e-7)
  # Non-positive kappa (flat or concave) contributes nothing; lam must be positive.
  assert float(flatness.sigma_optimised({'k': jnp.asarray([0.0, -1.0])}, lam)) == 0.0
  with pytest.raises(ValueError, match='lam'):
    flatness.sigma_optimised({'k': jnp.asarray(kappa)}, 0.0)


def test_filter_wise_measure_is_invariant_behind_batch_norm(key):
  with jax.enable_x64(True):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
      'w1': jax.random.normal(k1, (5, 6), jnp.float64),
      'w2': jax.random.normal(k2, (6, 3), jnp.float64),
      'b2': jnp.zeros(3, jnp.float64),
    }
    x = jax.random.normal(k3, (32, 5), jnp.float64)
    y = jax.random.randint(k3, (32,), 0, 3)

    def apply(p, x):
      h = x @ p['w1']
      h = (h - h.mean(0)) / jnp.sqrt(h.var(0))  # batch norm with batch statistics, eps 0
      return jax.nn.relu(h) @ p['w2'] + p['b2']

    def loss(p):
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(apply(p, x)), y[:, None], -1))

    c = jnp.exp(jax.random.uniform(jax.random.fold_in(key, 5), (6,), minval=-3, maxval=3))
    scaled = {**params, 'w1': params['w1'] * c}
    assert float(loss(scaled)) == pytest.approx(float(loss(params)), rel=1e-12)
    probe = jax.random.fold_in(key, 6)
    est = [
      flatness.hutchinson_trace(
        flatness.filter_normalized_op(loss, p), p, key=probe, num_probes=16
      ).value
      for p in (params, scaled)
    ]
    assert float(est[1]) == pytest.approx(float(est[0]), rel=1e-10)
    # Its exact value: sum over filters of ||w_f||^2 tr(H_ff), plus the 1-D leaf's terms.
    h = flatness.exact_hessian(loss, params)
    flat_s = ravel_pytree(flatness.filter_scales(params))[0]
    exact = float(jnp.sum(flat_s**2 * jnp.diag(h)))
    exact_op = ravel_pytree(
      flatness.exact_diagonal(flatness.filter_normalized_op(loss, params), params)
    )[0]
    assert float(jnp.sum(exact_op)) == pytest.approx(exact, rel=1e-10)
    # The raw trace of the scaled block is not invariant.
    h2 = flatness.exact_hessian(loss, scaled)
    assert abs(float(jnp.trace(h2[:30, :30]) / jnp.trace(h[:30, :30])) - 1) > 0.1


def test_matrix_norm_products_see_neuron_wise_but_not_layer_wise_rescaling(key):
  with jax.enable_x64(True):
    _, params, apply, _ = _mlp_loss(key, widths=(5, 7, 3))
    ws = lambda p: [p[f'l{i}']['w'] for i in range(len(p))]  # noqa: E731
    base = flatness.matrix_norm_products(ws(params))
    layer = flatness.matrix_norm_products(ws(_rescale(params, key, layerwise=10.0)))
    neuron = flatness.matrix_norm_products(ws(_rescale(params, key)))
    for k in base._fields:
      b = float(getattr(base, k))
      assert float(getattr(layer, k)) == pytest.approx(b, rel=1e-10)
      assert abs(float(getattr(neuron, k)) / b - 1) > 0.5
    # The path-norm is invariant to both (each path's product of weights is unchanged), when
    # there are no biases along the path.
    nob = {k: {'w': v['w'], 'b': jnp.zeros_like(v['b'])} for k, v in params.items()}
    pn = float(flatness.path_norm(apply, nob, (5,), jnp.float64))
    assert pn > 0
    rescaled = float(flatness.path_norm(apply, _rescale(nob, key), (5,), jnp.float64))
    assert rescaled == pytest.approx(pn, rel=1e-10)


def test_rescale_neurons_keeps_the_function_and_moves_the_norms(key):
  with jax.enable_x64(True):
    _, params, apply, x = _mlp_loss(key, widths=(5, 7, 6, 3))
    scaled = flatness.rescale_neurons(
      params, ['l0', 'l1', 'l2'], key=key, low=0.1, high=10.0, kernel='w', bias='b'
    )
    np.testing.assert_allclose(apply(scaled, x), apply(params, x), rtol=1e-12, atol=1e-12)
    ratio = scaled['l0']['w'][0] / params['l0']['w'][0]
    assert 0.1 <= float(jnp.min(ratio)) and float(jnp.max(ratio)) <= 10.0
    assert float(jnp.max(ratio) / jnp.min(ratio)) > 3
    with pytest.raises(ValueError, match='low'):
      flatness.rescale_neurons(
        params, ['l0', 'l1'], key=key, low=0.0, high=10.0, kernel='w', bias='b'
      )


def test_sharpness_sigma_bisects_a_known_excess(key):
  # excess(sigma) = sigma * mean |z| for the fixed draws (isotropic) and sigma * mean |theta z|
  # (magnitude-aware): linear, so the bisection's answer has a closed form.
  theta = {'w': jnp.array([0.5, -2.0, 3.0])}
  err = lambda p: jnp.mean(jnp.abs(p['w'] - theta['w']))  # noqa: E731
  k = jax.random.fold_in(key, 1)
  z = jax.random.normal(jax.random.split(k, 1)[0], (4, 3))
  for magnitude, scale in ((False, 1.0), (True, jnp.abs(theta['w']))):
    got = flatness.sharpness_sigma(
      err, theta, key=k, target=0.05, magnitude=magnitude, num_samples=4, iters=40
    )
    want = 0.05 / float(jnp.mean(jnp.abs(scale * z)))
    assert float(got) == pytest.approx(want, rel=1e-6)
  with pytest.raises(ValueError, match='num_samples'):
    flatness.sharpness_sigma(err, theta, key=k, num_samples=0)


def test_measure_fn_is_invariant_where_it_says_so(key):
  # float32, as the zoo runs it: a small ReLU MLP on fixed data, a random neuron-wise
  # rescaling with factors in [0.1, 10], the same probe key.
  _, params, apply, x = _mlp_loss(key, jnp.float32, widths=(6, 16, 12, 4))
  y = jax.random.randint(jax.random.fold_in(key, 7), (x.shape[0],), 0, 4)
  # Fit the labels first: noise must be able to raise the error (the sharpness bisection).
  ce = lambda p: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(apply(p, x)), y[:, None], -1))  # noqa: E731
  fit = jax.jit(lambda p: jax.tree.map(lambda t, g: t - 0.5 * g, p, jax.grad(ce)(p)))
  for _ in range(300):
    params = fit(params)
  assert float(jnp.mean(jnp.argmax(apply(params, x), -1) == y)) > 0.9
  fn = flatness.measure_fn(apply, num_probes=8, lanczos_iters=8, sharpness_samples=4)
  scaled = flatness.rescale_neurons(
    params, ['l0', 'l1', 'l2'], key=key, low=0.1, high=10.0, kernel='w', bias='b'
  )
  a, b = fn(params, x, y, key=key), fn(scaled, x, y, key=key)
  a, b = a.to_json(), b.to_json()
  for m in flatness.NORMALIZED_MEASURES:
    assert b[m] == pytest.approx(a[m], rel=1e-5), m
  for m in flatness.RAW_MEASURES:
    assert max(b[m] / a[m], a[m] / b[m]) > 2, m
  bad = jax.tree.map(lambda t: t, params)
  bad['l2']['b'] = bad['l2']['b'].at[0].set(jnp.inf)
  with pytest.raises(ValueError, match=r"\['l2'\]\['b'\].*non-finite"):
    fn(bad, x, y, key=key)
  # Against the dense references: the normalized trace's mean is tr(D H D) within its error.
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda t: t.astype(jnp.float64), params)

    def loss64(p):
      logp = jax.nn.log_softmax(apply(p, x.astype(jnp.float64)))
      return -jnp.mean(jnp.take_along_axis(logp, y[:, None], -1))

    h = flatness.exact_hessian(loss64, p64)
    theta = ravel_pytree(p64)[0]
    exact = float(jnp.sum(theta**2 * jnp.diag(h)))
  assert abs(a['normalized_trace'] - exact) < 5 * a['normalized_trace_stderr']


def test_random_draws_are_those_of_one_call_per_leaf(key):
  # Drawn flat and reshaped (fast to compile on CPU), with the values of a per-leaf draw.
  like = {'conv': jnp.zeros((3, 3, 4, 5)), 'bias': jnp.zeros((5,)), 'dense': jnp.zeros((6, 2))}
  probes = flatness.rademacher_probes(like, 4, key=key)
  keys = jax.random.split(key, 3)
  for k, x, got in zip(keys, jax.tree.leaves(like), jax.tree.leaves(probes), strict=True):
    np.testing.assert_array_equal(got, jax.random.rademacher(k, (4, *x.shape), jnp.float32))


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name='c0')(x))
    x = nn.max_pool(nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), name='c1')(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(5, name='d0')(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, name='d1')(x)


def test_rescale_neurons_on_a_conv_net_keeps_the_function(key):
  # Per-output-channel factors through ReLU and max pooling, into a conv and a flattened dense.
  model = _ConvNet()
  x = jax.random.uniform(key, (4, 8, 8, 2))
  with jax.enable_x64(True):
    v = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(key, x[:1]))
    scaled = flatness.rescale_neurons(v['params'], ['c0', 'c1', 'd0', 'd1'], key=key)
    x64 = x.astype(jnp.float64)
    np.testing.assert_allclose(
      model.apply({'params': scaled}, x64), model.apply(v, x64), rtol=1e-10, atol=1e-12
    )
    assert not np.allclose(scaled['c1']['kernel'], v['params']['c1']['kernel'])
    with pytest.raises(ValueError, match="'d1'.*'c1'"):
      flatness.rescale_neurons(v['params'], ['c1', 'd1'], key=key)


def test_measures_that_do_not_apply_are_refused_or_labelled(key):
  model = _ConvNet()
  x = jax.random.uniform(key, (8, 8, 8, 2))
  y = jnp.arange(8) % 3
  params = model.init(key, x[:1])['params']
  apply = lambda p, z: model.apply({'params': p}, z)  # noqa: E731
  why = flatness.inapplicable_measures(apply, params, x.shape[1:])
  assert 'reduce_window_max' in why['path_norm'] and 'conv' in why['spectral_product']
  fn = flatness.measure_fn(apply, num_probes=2, chunk=2, lanczos_iters=2, sharpness_samples=2,
                           sharpness_iters=2, gn_chunk=8)  # fmt: skip
  out = fn(params, x, y, key=key)
  assert out.path_norm is None and out.spectral_product is None
  assert float(out.reshaped_spectral_product) > 0
  assert {'path_norm', 'spectral_product'}.isdisjoint(out.to_json())
  # A plain ReLU MLP keeps both.
  _, mlp, mlp_apply, xm = _mlp_loss(key, jnp.float32, widths=(6, 8, 4))
  assert flatness.inapplicable_measures(mlp_apply, mlp, xm.shape[1:]) == {}
