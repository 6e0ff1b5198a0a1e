"""Tests for tsuzuku_jax.attacks against the closed-form adversarial distance of a linear model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsuzuku_jax import attacks

B, H, W, C, K = 64, 4, 4, 1, 10
D = H * W * C


@functools.cache
def _linear_problem():
  """A linear classifier, images in [0,1], labels = clean argmax, and the exact distances.

  Cached so that every test passes the same `logits_fn` object (a static argument of the jitted
  attack) and the attack compiles once per configuration.
  """
  k_w, k_b, k_x = jax.random.split(jax.random.key(0), 3)
  weight = jax.random.normal(k_w, (D, K))
  bias = 0.1 * jax.random.normal(k_b, (K,))
  x = jax.random.uniform(k_x, (B, H, W, C))

  def logits_fn(z):
    return z.reshape(z.shape[0], -1) @ weight + bias

  # Independent oracle in float64 numpy: distance to the boundary between y and i (no box) is
  # (z_y - z_i) / ||w_y - w_i||; the minimal adversarial distance is the min over i != y.
  w64 = np.asarray(weight, np.float64)
  z64 = np.asarray(x, np.float64).reshape(B, D) @ w64 + np.asarray(bias, np.float64)
  y = z64.argmax(-1)
  diff_w = w64[:, y].T[:, :, None] - w64[None, :, :]  # (B, D, K): w_y - w_i
  gaps = z64[np.arange(B), y][:, None] - z64  # (B, K): z_y - z_i
  with np.errstate(divide='ignore', invalid='ignore'):
    dist = gaps / np.linalg.norm(diff_w, axis=1)
  dist[np.arange(B), y] = np.inf
  dist = dist.min(-1)
  return logits_fn, x, jnp.asarray(y, jnp.int32), dist, (weight, bias)


def _mlp(key):
  k1, k2 = jax.random.split(key)
  w1 = jax.random.normal(k1, (D, 32)) / np.sqrt(D)
  w2 = jax.random.normal(k2, (32, K)) / np.sqrt(32)

  def logits_fn(z):
    return jax.nn.relu(z.reshape(z.shape[0], -1) @ w1) @ w2

  return logits_fn


def _misclassified(logits_fn, x_adv, y):
  return ~np.asarray(attacks.is_correct(logits_fn(x_adv), y))


def test_margin_and_tie(key):
  logits = jnp.array([[1.0, 3.0, 2.0], [2.0, 2.0, 0.0], [5.0, 1.0, 0.0]])
  y = jnp.array([1, 0, 0])
  np.testing.assert_allclose(attacks.margin(logits, y), [-1.0, 0.0, -4.0])
  np.testing.assert_array_equal(attacks.is_correct(logits, y), [True, False, True])


# Cross-entropy ascent follows the most probable wrong class, not the nearest boundary, so it
# can stall in a local optimum on the sphere more often than the margin loss.
@pytest.mark.parametrize('loss,min_rate', [('margin', 0.95), ('ce', 0.85)])
def test_finds_attack_just_outside_the_exact_distance(key, loss, min_rate):
  logits_fn, x, y, dist, _ = _linear_problem()
  eps = jnp.asarray(1.05 * dist, jnp.float32)
  x_adv = attacks.pgd_l2(
    logits_fn, x, y, eps, key=jax.random.key(1), loss=loss, clip_min=None, clip_max=None
  )
  assert np.mean(_misclassified(logits_fn, x_adv, y)) >= min_rate
  assert np.all(np.asarray(attacks.l2_norm(x_adv - x)) <= np.asarray(eps))


def test_no_attack_inside_the_exact_distance_and_sound_certificate(key):
  logits_fn, x, y, dist, _ = _linear_problem()
  eps = jnp.asarray(0.95 * dist, jnp.float32)
  kw = dict(key=jax.random.key(2), clip_min=None, clip_max=None)
  assert float(attacks.robust_accuracy(logits_fn, x, y, eps, **kw)) == 1.0
  certified = jnp.ones((B,), bool)
  assert int(attacks.count_violations(logits_fn, x, y, eps, certified, **kw)) == 0


def test_unsound_certificate_is_caught(key):
  logits_fn, x, y, dist, _ = _linear_problem()
  radius = jnp.asarray(1.2 * dist, jnp.float32)
  kw = dict(key=jax.random.key(3), clip_min=None, clip_max=None)
  certified = jnp.ones((B,), bool)
  count = attacks.count_violations(logits_fn, x, y, radius, certified, **kw)
  assert count.dtype == jnp.int32
  assert int(count) >= 0.9 * B
  # Points not claimed certified are never counted.
  half = jnp.arange(B) % 2 == 0
  mask = attacks.violation_mask(logits_fn, x, y, radius, half, **kw)
  assert not np.any(np.asarray(mask)[1::2])
  assert int(attacks.count_violations(logits_fn, x, y, radius, half, **kw)) == int(mask.sum())


def test_norm_bound_and_box(key):
  logits_fn, x, y, dist, _ = _linear_problem()
  for eps in [jnp.asarray(2.0 * dist, jnp.float32), jnp.float32(3.0)]:
    x_adv = attacks.pgd_l2(logits_fn, x, y, eps, key=key, steps=10, restarts=2)
    eps_b = np.broadcast_to(np.asarray(eps), (B,))
    # Exact in float32 with the library's measure (eager here, jitted inside), and in float64.
    assert np.all(np.asarray(attacks.l2_norm(x_adv - x)) <= eps_b)
    delta64 = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
    assert np.all(np.linalg.norm(delta64.reshape(B, -1), axis=1) <= eps_b)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype


def test_per_example_eps_with_zeros(key):
  logits_fn, x, y, dist, _ = _linear_problem()
  zero = np.arange(B) % 3 == 0
  eps = jnp.asarray(np.where(zero, 0.0, 1.05 * dist), jnp.float32)
  x_adv = attacks.pgd_l2(logits_fn, x, y, eps, key=key, clip_min=None, clip_max=None)
  np.testing.assert_array_equal(np.asarray(x_adv)[zero], np.asarray(x)[zero])
  wrong = _misclassified(logits_fn, x_adv, y)
  assert not np.any(wrong[zero])
  assert np.mean(wrong[~zero]) >= 0.95
  assert np.all(np.asarray(attacks.l2_norm(x_adv - x)) <= np.asarray(eps))


def test_under_outer_jit_with_traced_params(key):
  logits_fn, x, y, dist, (weight, bias) = _linear_problem()

  @jax.jit
  def attack(weight, bias, x, y, eps, key):
    logits_fn = lambda z: z.reshape(z.shape[0], -1) @ weight + bias
    kw = dict(key=key, clip_min=None, clip_max=None, steps=20, restarts=2)
    x_adv = attacks.pgd_l2(logits_fn, x, y, eps, **kw)
    return x_adv, attacks.robust_accuracy(logits_fn, x, y, eps, **kw)

  eps = jnp.asarray(1.05 * dist, jnp.float32)
  x_adv, acc = attack(weight, bias, x, y, eps, jax.random.key(4))
  assert np.mean(_misclassified(logits_fn, x_adv, y)) >= 0.9
  assert float(acc) <= 0.1
  assert np.all(np.asarray(attacks.l2_norm(x_adv - x)) <= np.asarray(eps))


def test_robust_accuracy_decreases_with_eps(key):
  logits_fn = _mlp(key)
  x = jax.random.uniform(jax.random.key(5), (B, H, W, C))
  y = jnp.argmax(logits_fn(x), -1)
  accs = [
    float(attacks.robust_accuracy(logits_fn, x, y, eps, key=jax.random.key(6)))
    for eps in [0.0, 0.05, 0.2, 0.5, 1.0, 2.0]
  ]
  assert accs[0] == 1.0
  assert all(a >= b for a, b in zip(accs, accs[1:], strict=False)), accs
  assert accs[-1] < 0.5, accs
  kw = dict(key=jax.random.key(6), batch_size=48, steps=10, restarts=1)
  batched = [float(attacks.robust_accuracy_batched(logits_fn, x, y, e, **kw)) for e in [0.0, 2.0]]
  assert batched[0] == 1.0 and batched[1] < 0.5, batched


def test_bad_input_is_refused_by_name(key):
  logits_fn, x, y, _, _ = _linear_problem()
  bad = np.array(x)
  bad[7, 1, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r'x\[7, 1, 2, 0\] is nan; expected finite'):
    attacks.pgd_l2(logits_fn, bad, y, 0.1, key=key, steps=1, restarts=1)
  bad[7, 1, 2, 0] = -0.5
  with pytest.raises(ValueError, match=r'x\[7, 1, 2, 0\] = -0.5 is outside \[0, 1\]'):
    attacks.robust_accuracy(logits_fn, bad, y, 0.1, key=key, steps=1, restarts=1)
  # Without a box there is no pixel range to check.
  attacks.pgd_l2(logits_fn, bad, y, 0.1, key=key, steps=1, restarts=1, clip_min=None)
  with pytest.raises(ValueError, match=rf'y\[0\] = {K} is outside \[0, {K}\)'):
    attacks.pgd_l2(logits_fn, x, jnp.full((B,), K), 0.1, key=key, steps=1, restarts=1)
  with pytest.raises(ValueError, match='eps must be finite and >= 0'):
    attacks.pgd_l2(logits_fn, x, y, -0.1, key=key, steps=1, restarts=1)


def test_random_perturbations_have_the_norm(key):
  r = attacks.random_perturbations((6, 6, 2), 1.5, 5, key=key)
  np.testing.assert_allclose(jnp.linalg.norm(r.reshape(5, -1), axis=1), 1.5, rtol=1e-5)
  r = attacks.random_perturbations((6, 6, 2), 0.1, 3, key=key, norm='linf')
  np.testing.assert_allclose(jnp.abs(r), 0.1)
