"""Tests for tsuzuku_jax.lmt: margin logits, losses, certified radii and their soundness.

References: hand-written numpy loops for every formula, and a real attack
(`tsuzuku_jax.attacks`) inside the certified balls of randomly initialised networks, which must
find nothing for the sound bounds and must find violations for a deliberately wrong bound.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fake_variables import random_variables

from tsuzuku_jax import lmt, models, train_lib

K = 5


def _problem(seed, batch=12, k=K):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 1, (batch, k)).astype(np.float32)
  labels = rng.integers(0, k, batch).astype(np.int32)
  lip = rng.uniform(0.5, 2.0, (k, k))
  pair_lip = ((lip + lip.T) / 2).astype(np.float32)  # symmetric, like real pairwise bounds
  return logits, labels, pair_lip


def _margin_loop(logits, labels, pair_lip, c, clip):
  out = logits.astype(np.float64).copy()
  for b, y in enumerate(labels):
    others = [i for i in range(logits.shape[1]) if i != y]
    factor = 1.0
    if clip:
      ratios = [(logits[b, y] - logits[b, i]) / (c * pair_lip[y, i]) for i in others]
      factor = min(max(min(ratios), 0.0), 1.0)
    for i in others:
      out[b, i] += factor * c * pair_lip[y, i]
  return out


@pytest.mark.parametrize('clip', [False, True])
def test_margin_logits_against_loop(clip):
  logits, labels, pair_lip = _problem(0)
  # Make sure the clip sees the three regimes: misclassified, partial margin, full margin.
  logits[0] = [3.0, 0.0, 0.0, 0.0, 0.0]
  labels[0] = 1  # misclassified -> factor 0
  logits[1] = [30.0, 0.0, 0.0, 0.0, 0.0]
  labels[1] = 0  # huge margin -> factor 1
  c = 0.7
  fn = jax.jit(functools.partial(lmt.margin_logits, clip=clip))
  got = np.asarray(fn(logits, labels, pair_lip, c), np.float64)
  np.testing.assert_allclose(got, _margin_loop(logits, labels, pair_lip, c, clip), rtol=1e-6)
  if clip:
    np.testing.assert_array_equal(got[0], logits[0])  # nothing added when misclassified
  assert got[1, 1] == pytest.approx(c * pair_lip[0, 1], rel=1e-6)
  assert got[2, labels[2]] == logits[2, labels[2]]  # the true logit never moves


def test_clipped_margin_gradient_does_not_flow_through_the_factor():
  logits, labels, pair_lip = _problem(1)
  c = 0.7
  weights = np.random.default_rng(2).normal(0, 1, logits.shape).astype(np.float32)

  @jax.jit
  def grads(z, lip):
    f = lambda z, lip: jnp.sum(weights * lmt.margin_logits(z, labels, lip, c, clip=True))
    return jax.grad(f, argnums=(0, 1))(z, lip)

  g_logits, g_lip = (np.asarray(g, np.float64) for g in grads(logits, pair_lip))
  # The factor is a constant: d/dz is the identity (weights), d/dL is c * factor per entry.
  np.testing.assert_allclose(g_logits, weights, rtol=1e-6)
  want = np.zeros((K, K))
  clipped = _margin_loop(logits, labels, pair_lip, c, clip=True) - logits
  for b, y in enumerate(labels):
    for i in range(K):
      if i != y:
        factor = clipped[b, i] / (c * pair_lip[y, i])
        want[y, i] += c * factor * weights[b, i]
  assert 0 < np.count_nonzero(want)
  np.testing.assert_allclose(g_lip, want, rtol=1e-5, atol=1e-6)


def test_gloro_logits_extra_column():
  logits, labels, pair_lip = _problem(3)
  c = 0.4
  got = np.asarray(jax.jit(lmt.gloro_logits)(logits, labels, pair_lip, c), np.float64)
  assert got.shape == (len(labels), K + 1)
  np.testing.assert_array_equal(got[:, :K], logits)
  for b, y in enumerate(labels):
    want = max(logits[b, i] + c * pair_lip[y, i] for i in range(K) if i != y)
    assert got[b, K] == pytest.approx(want, rel=1e-6)


def _bounds(seed=4):
  rng = np.random.default_rng(seed)
  head = rng.normal(0, 1, (6, K))
  pairwise = np.linalg.norm(head[:, :, None] - head[:, None, :], axis=0)
  norm = np.linalg.svd(head, compute_uv=False)[0]
  est = lmt.Estimate(jnp.asarray(1.7 * pairwise, jnp.float32), jnp.float32(1.7 * norm))
  return est, pairwise, norm


def test_pairwise_bounds_forms():
  bounds, pairwise, norm = _bounds()
  glob = np.asarray(lmt.pairwise_bounds(bounds, 'global'))
  pair = np.asarray(lmt.pairwise_bounds(bounds, 'pairwise'))
  assert glob.shape == pair.shape == (K, K)
  np.testing.assert_allclose(glob, np.sqrt(2) * 1.7 * norm, rtol=1e-6)
  np.testing.assert_allclose(pair, 1.7 * pairwise, rtol=1e-6)
  # ||w_i - w_j|| <= sqrt(2) ||W||: the pairwise form is never looser.
  assert np.all(pair <= glob * (1 + 1e-6))
  with pytest.raises(ValueError, match='form'):
    lmt.pairwise_bounds(bounds, 'local')
  # A certificate's global form is rounded up from float64.
  cert = _model('mlp')[3]
  glob = np.asarray(lmt.pairwise_bounds(cert, 'global'), np.float64)
  assert np.all(glob >= np.sqrt(2) * cert.lipschitz)
  with pytest.raises(TypeError, match='Estimate'):
    lmt.pairwise_bounds({'pairwise': pairwise}, 'pairwise')


def _radius_loop(logits, pair_lip):
  preds, radii = [], []
  for z in logits.astype(np.float64):
    p = int(np.argmax(z))
    r = np.inf
    for i in range(len(z)):
      if i == p:
        continue
      gap, lip = z[p] - z[i], float(pair_lip[p, i])
      r = min(r, gap / lip if lip > 0 else (np.inf if gap > 0 else 0.0))
    preds.append(p)
    radii.append(max(r, 0.0))
  return np.array(preds), np.array(radii)


def test_certified_radius_against_loop_with_ties_and_zero_lipschitz():
  logits, _, pair_lip = _problem(5)
  logits[0] = [1.0, 2.0, 2.0, 0.0, 0.0]  # tie for the top logit
  logits[1] = [4.0, 4.0, 4.0, 4.0, 4.0]  # all tied
  zero = pair_lip.copy()
  zero[3, :] = 0.0  # class 3 can never be overtaken under this "bound"
  logits[2] = [0.0, 0.0, 0.0, 1.0, 0.5]
  logits[3] = [0.0, 0.0, 0.0, 1.0, 1.0]  # tie with a zero bound: still not certified
  fn = jax.jit(lmt.certified_radius)
  for lip in (pair_lip, zero):
    pred, radius = (np.asarray(a) for a in fn(logits, lip))
    want_pred, want_radius = _radius_loop(logits, lip)
    np.testing.assert_array_equal(pred, want_pred)
    np.testing.assert_allclose(radius, want_radius, rtol=1e-6)
    assert radius[0] == 0 and radius[1] == 0 and radius[3] == 0
    assert pred.dtype == np.int32 and radius.dtype == np.float32
  assert np.isinf(radius[2]) and pred[2] == 3


def test_certified_accuracy_monotone_in_eps():
  logits, labels, pair_lip = _problem(6, batch=200)
  logits[:2] = 1.0  # two ties: radius 0, never certified even when the argmax is the label
  labels[:2] = 0
  pred, radius = jax.jit(lmt.certified_radius)(logits, pair_lip)
  eps = np.array([0.0, 0.05, 0.1, 0.2, 0.4, 1.0, 10.0], np.float32)
  acc = np.asarray(jax.jit(lmt.certified_accuracy)(pred, radius, labels, eps))
  pred, radius = np.asarray(pred), np.asarray(radius)
  want = [np.mean((pred == labels) & (radius > e)) for e in eps]
  np.testing.assert_allclose(acc, want, rtol=1e-6)
  assert np.all(np.diff(acc) <= 0) and acc[-1] == 0
  assert acc[0] == pytest.approx(np.mean((pred == labels) & (radius > 0)))
  assert acc[0] < np.mean(pred == labels)


# ----------------------------------------------------------------------------- with models

CONFIGS = {
  'mlp': dict(hidden=(24, 16)),
  'cnn': dict(channels=(4, 8), dense=16),
}


@functools.cache
def _model(name):
  """(apply_fn, variables, logits_fn, certificate); the same logits_fn object every time
  (it is a static argument of the jitted attack)."""
  model = models.get_model(name, K, **CONFIGS[name])
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  variables = random_variables(
    jax.eval_shape(model.init, jax.random.key(0), x), np.random.default_rng(7)
  )
  apply_fn = train_lib.apply_fn(model)

  def logits_fn(images):
    return apply_fn(variables, images)

  return apply_fn, variables, logits_fn, lmt.certificate(apply_fn, variables, (8, 8, 1))


def _radii(logits, cert, divisor):
  """{form: (pred, radius)} with the pairwise bounds divided by `divisor` (1 = sound)."""
  return {
    f: jax.jit(lmt.certified_radius)(logits, lmt.pairwise_bounds(cert, f) / divisor)
    for f in lmt.FORMS
  }


def _data(n, seed=8):
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32), rng.integers(0, K, n).astype(np.int32)


VARIANTS = [('lmt', False), ('lmt', True), ('gloro', False)]


def test_lmt_loss_variants_finite_and_bound_gradient():
  apply_fn, variables, _, _ = _model('mlp')
  x, y = _data(16)
  iterates = lmt.init_iterates(apply_fn, variables, (8, 8, 1), key=jax.random.key(0))

  @jax.jit
  def losses_and_grads(params, c):
    def loss(params, form, variant, clip):
      v = {'params': params}
      fn = lmt.make_loss(apply_fn, (8, 8, 1), form=form, variant=variant, clip=clip)
      return fn(v, iterates, apply_fn(v, x), y, c)[0]

    return {
      (form, variant, clip): jax.value_and_grad(loss)(params, form, variant, clip)
      for form in lmt.FORMS
      for variant, clip in VARIANTS
    }

  at0 = losses_and_grads(variables['params'], 0.0)
  at2 = losses_and_grads(variables['params'], 2.0)
  for case, (loss1, grad1) in at2.items():
    loss0, grad0 = at0[case]
    assert np.isfinite(float(loss0)) and np.isfinite(float(loss1)), case
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grad1)), case
    # The margin raises the wrong logits, so the loss grows with c ...
    assert float(loss1) > float(loss0), case
    # ... and the bound contributes to the gradient of the head kernel.
    diff = np.abs(np.asarray(grad1['head']['kernel']) - np.asarray(grad0['head']['kernel']))
    assert diff.max() > 1e-4, case
  bounds = _bounds()[0]
  with pytest.raises(ValueError, match='variant'):
    lmt.lmt_loss(jnp.zeros((2, K)), jnp.zeros(2, jnp.int32), bounds, 0.1, variant='trades')
  with pytest.raises(ValueError, match='variant'):
    lmt.make_loss(apply_fn, (8, 8, 1), variant='trades')


def test_lmt_term_step_lowers_the_certified_bound():
  apply_fn, variables, _, _ = _model('mlp')
  x, y = _data(16)
  c = 10.0
  shape = (8, 8, 1)

  def lmt_term(params, iterates):
    # Only the Lipschitz-margin part: the loss at c minus the plain cross-entropy.
    v = {'params': params}
    logits = apply_fn(v, x)
    bounds, _ = lmt.estimate(apply_fn, v, iterates, shape)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return lmt.lmt_loss(logits, y, bounds, c, form='global') - plain

  @jax.jit
  def step(params, iterates):
    # Converge the power iterates first (as after some training), so the estimate is tight.
    power = lambda _, it: lmt.estimate(apply_fn, {'params': params}, it, shape)[1]  # noqa: E731
    iterates = jax.lax.fori_loop(0, 100, power, iterates)
    grad = jax.grad(lmt_term)(params, iterates)
    return jax.tree.map(lambda p, g: p - 1e-2 * g, params, grad)

  params = variables['params']
  new = step(params, lmt.init_iterates(apply_fn, variables, shape, key=jax.random.key(1)))
  before = lmt.certificate(apply_fn, {'params': params}, shape).lipschitz
  after = lmt.certificate(apply_fn, {'params': new}, shape).lipschitz
  assert after < 0.99 * before, (before, after)


def test_c_schedule_ramps_then_stays():
  sched = lmt.c_schedule(0.5, 100)
  values = np.array([float(sched(s)) for s in [0, 25, 50, 100, 150, 10_000]])
  # optax evaluates the ramp in float32 as (start - c) * (1 - t) + c: ~1e-8 absolute error.
  want = 1e-5 + (0.5 - 1e-5) * np.array([0.0, 0.25, 0.5, 1.0, 1.0, 1.0])
  np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-7)
  assert np.all(np.diff(values) >= 0)
  assert float(lmt.c_schedule(0.5, 0)(0)) == 0.5


# The largest ||grad(z_i - z_j)|| found over the bound is 0.26 (MLP) and 0.066 (CNN: its max
# pooling and ReLUs rarely align the worst case) at these random weights, so the divisors
# below take the bound well under what the gradients show.
WRONG_DIVISOR = {'mlp': 10.0, 'cnn': 1000.0}


@pytest.mark.parametrize('name', CONFIGS)
def test_certified_radii_survive_attack_and_wrong_bound_does_not(name):
  attacks = pytest.importorskip('tsuzuku_jax.attacks', reason='tsuzuku_jax/attacks.py is absent')
  _, _, logits_fn, bounds = _model(name)
  x, _ = _data(48, seed=9)
  logits = jax.jit(logits_fn)(x)
  key = jax.random.key(10)
  pgd = dict(steps=30, restarts=2, clip_min=None, clip_max=None)
  for form, (pred, radius) in _radii(logits, bounds, 1.0).items():
    certified = np.asarray(radius > 0)
    assert certified.mean() > 0.5, form  # labels = predictions: most points are certified
    n = attacks.count_violations(logits_fn, x, pred, radius, certified, key=key, **pgd)
    assert int(n) == 0, (form, int(n))
  # A bound that is too small claims radii that are too large: the attack must break some.
  pred, radius = _radii(logits, bounds, WRONG_DIVISOR[name])['pairwise']
  n = attacks.count_violations(logits_fn, x, pred, radius, radius > 0, key=key, **pgd)
  assert int(n) > 0


def test_certify_dataset_keys_shapes_and_median():
  apply_fn, variables, logits_fn, bounds = _model('mlp')
  x, y = _data(50, seed=11)
  eps = [0.0, 0.01, 0.1]
  out = lmt.certify_dataset(apply_fn, variables, bounds, x, y, eps, batch_size=16)
  assert isinstance(out, lmt.Radii) and set(out.forms) == set(lmt.FORMS)
  assert out.pred.shape == out.correct.shape == (50,)
  np.testing.assert_array_equal(out.eps, np.float32(eps))
  logits = jax.jit(logits_fn)(x)
  np.testing.assert_array_equal(out.pred, np.argmax(np.asarray(logits), -1))
  np.testing.assert_array_equal(out.correct, out.pred == y)
  assert 0 < out.correct.sum() < 50  # random labels: some right, some wrong
  radii = _radii(logits, bounds, 1.0)
  for form in lmt.FORMS:
    r, acc, median = out.forms[form]
    assert r.shape == (50,) and acc.shape == (3,)
    np.testing.assert_allclose(r, np.asarray(radii[form][1]), rtol=1e-6)
    # Misclassified points count as radius 0 in the median (as in LMT).
    assert median == pytest.approx(float(np.median(np.where(out.correct, r, 0.0))))
    assert median < float(np.median(r))
    np.testing.assert_allclose(acc, [np.mean(out.correct & (r > e)) for e in eps], rtol=1e-6)


def test_non_finite_input_is_never_certified():
  # Observed: a nan image was certified (radius nan, prediction 0) without complaint.
  apply_fn, variables, logits_fn, bounds = _model('mlp')
  x, y = _data(8, seed=12)
  bad = x.copy()
  bad[5, 3, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r'images\[5, 3, 2, 0\] is nan; expected finite'):
    lmt.certify_dataset(apply_fn, variables, bounds, bad, y, [0.1])
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r'images\[5, 3, 2, 0\] is nan'):
    lmt.robustness_report(apply_fn, variables, bounds, bad, y, [0.1], key=key, steps=1, restarts=1)
  with pytest.raises(ValueError, match=r'images\[1, 0, 0, 0\] = 2 is outside \[0, 1\]'):
    big = x.copy()
    big[1, 0, 0, 0] = 2.0
    lmt.robustness_report(apply_fn, variables, bounds, big, y, [0.1], key=key, steps=1, restarts=1)
  with pytest.raises(ValueError, match=rf'labels\[2\] = {K} is outside \[0, {K}\)'):
    lmt.certify_dataset(apply_fn, variables, bounds, x, np.array([0, 1, K, 0, 0, 0, 0, 0]), [0.1])
  # Inside a jit nothing can be refused: non-finite logits certify nothing (radius 0).
  pair = lmt.pairwise_bounds(bounds, 'pairwise')
  logits = jnp.asarray(jax.jit(logits_fn)(x)).at[3, 1].set(jnp.nan).at[4, 0].set(jnp.inf)
  _, radius = jax.jit(lmt.certified_radius)(logits, pair)
  assert float(radius[3]) == 0.0 and float(radius[4]) == 0.0 and float(radius[0]) > 0
