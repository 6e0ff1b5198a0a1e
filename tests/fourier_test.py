"""Fourier basis and heat maps against exact facts (closed forms, circular convolutions)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsuzuku_jax import attacks, fourier


def _explicit(h, w, u, v):
  m, n = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  t = 2 * np.pi * (u * m / h + v * n / w)
  return (np.cos(t) - np.sin(t)) / np.sqrt(h * w)


@pytest.mark.parametrize('hw', [(8, 8), (6, 10), (5, 7)])
def test_basis_matches_formula_and_is_orthonormal(hw):
  freqs = fourier.all_frequencies(hw)
  b = np.asarray(jax.jit(fourier.basis, static_argnums=0)(hw, freqs), np.float64)
  for k in (0, 1, 7, len(freqs) - 1):
    np.testing.assert_allclose(b[k], _explicit(*hw, *np.asarray(freqs[k])), atol=2e-6)
  flat = b.reshape(len(freqs), -1)
  np.testing.assert_allclose(flat @ flat.T, np.eye(len(freqs)), atol=1e-5)
  # (u, v) and (-u, -v) are different, orthogonal directions (cos - sin vs cos + sin).
  h, w = hw
  i, j = 1 * w + 2, ((h - 1) % h) * w + (w - 2) % w
  assert abs(flat[i] @ flat[j]) < 1e-5 and not np.allclose(flat[i], flat[j])


def _linf_closed_form(n, u, v):
  """max |cos t - sin t| / n over t = 2 pi k / p, p = n / gcd(u, v, n) (square n x n grid)."""
  p = n // math.gcd(math.gcd(u, v), n)
  return (
    max(abs(math.cos(2 * math.pi * k / p) - math.sin(2 * math.pi * k / p)) for k in range(p)) / n
  )


@pytest.mark.parametrize('u, v', [(0, 0), (4, 0), (2, 2), (1, 0), (3, 5), (4, 4)])
def test_linf_closed_forms(u, v):
  n = 8
  got = fourier.linf_of_unit_direction((n, n), (u, v))
  assert got == pytest.approx(_linf_closed_form(n, u, v), rel=1e-6)
  if math.gcd(math.gcd(u, v), n) == 1:
    assert got == pytest.approx(math.sqrt(2) / n, rel=1e-6)


def _circular_conv(x, k):
  """Single-channel circular convolution (correlation form, as lax.conv) via explicit rolls."""
  out = np.zeros_like(x)
  kh, kw = k.shape
  for i in range(kh):
    for j in range(kw):
      out += k[i, j] * np.roll(x, (-(i - kh // 2), -(j - kw // 2)), axis=(0, 1))
  return out


def test_circular_conv_keeps_the_frequency_with_fft_gain():
  rng = np.random.default_rng(0)
  n = 8
  k = rng.normal(size=(3, 3))
  kernel_full = np.zeros((n, n))
  for i in range(3):
    for j in range(3):
      kernel_full[(i - 1) % n, (j - 1) % n] = k[i, j]
  for u, v in [(1, 2), (3, 0), (0, 0), (4, 4)]:
    b = _explicit(n, n, u, v)
    y = _circular_conv(b, k)
    # The output stays in span{cos t, sin t} of the same frequency ...
    m, nn_ = np.meshgrid(np.arange(n), np.arange(n), indexing='ij')
    t = 2 * np.pi * (u * m + v * nn_) / n
    span = np.stack([np.cos(t).ravel(), np.sin(t).ravel()], 1)
    coef, *_ = np.linalg.lstsq(span, y.ravel(), rcond=None)
    np.testing.assert_allclose(span @ coef, y.ravel(), atol=1e-12)
    # ... with gain |FFT2(K)| at (u, v) (K correlated: conj of the convolution kernel's FFT).
    gain = np.abs(np.fft.fft2(kernel_full))[u, v]
    assert np.linalg.norm(y) == pytest.approx(gain, rel=1e-12)


class _LinearCircularNet(nn.Module):
  """Stride-1 circular convs, global average pooling, linear head; no nonlinearity."""

  @nn.compact
  def __call__(self, x):
    for c in (4, 5):
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='wrap')
      x = nn.Conv(c, (3, 3), padding='VALID')(x)
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_linear_conv_gap_net_is_sensitive_only_at_dc(key):
  net = _LinearCircularNet()
  x = jax.random.uniform(key, (32, 8, 8, 2))
  params = net.init(key, x)
  logits_fn = lambda im: net.apply(params, im)
  y = jnp.argmax(logits_fn(x), -1)
  _, loss = fourier.heat_map(logits_fn, x, y, 3.0, key=key, batch=16, chunk=16, clip=None)
  _, loss0 = fourier.heat_map(logits_fn, x, y, 0.0, key=key, batch=16, chunk=16, clip=None)
  diff = np.abs(np.asarray(loss - loss0))[0]
  assert diff[0, 0] > 1e-3  # the DC direction moves the logits
  diff[0, 0] = 0
  assert diff.max() < 1e-5  # no other frequency does


def _loop_heat_map(logits_fn, x, y, eps):
  """Reference: one frequency per dataset pass, per channel."""
  n, h, w, c = x.shape
  out = np.zeros((c, h, w))
  for u in range(h):
    for v in range(w):
      b = np.asarray(fourier.basis((h, w), jnp.asarray([[u, v]])))[0]
      for ch in range(c):
        d = np.zeros((h, w, c), np.float32)
        d[..., ch] = eps * b
        pred = np.argmax(np.asarray(logits_fn(jnp.clip(x + d, 0, 1))), -1)
        out[ch, u, v] = np.mean(pred != np.asarray(y))
  return out


def test_batched_per_channel_heat_map_equals_loop(key):
  k1, k2 = jax.random.split(key)
  w1 = jax.random.normal(k1, (4 * 4 * 2, 16))
  w2 = jax.random.normal(k2, (16, 3))
  logits_fn = jax.jit(lambda im: jnp.tanh(im.reshape(im.shape[0], -1) @ w1) @ w2)
  x = jax.random.uniform(key, (24, 4, 4, 2))
  y = jnp.arange(24) % 3
  err, _ = fourier.heat_map(logits_fn, x, y, 2.0, mode='per_channel', batch=8, chunk=5)
  # The same misclassified images at every frequency and channel (counts compared exactly).
  counts = lambda e: np.round(np.asarray(e, np.float64) * 24).astype(int)
  np.testing.assert_array_equal(counts(err), counts(_loop_heat_map(logits_fn, x, y, 2.0)))
  # Chunking does not change the map.
  err2, _ = fourier.heat_map(logits_fn, x, y, 2.0, mode='per_channel', batch=24, chunk=16)
  np.testing.assert_array_equal(np.asarray(err), np.asarray(err2))


def test_perturbation_norms():
  b = fourier.basis((8, 8), jnp.asarray([[1, 3]]))[0]
  d = fourier.perturbation(b, jnp.array([1.0, -1.0, 1.0]), 2.5)
  assert float(jnp.linalg.norm(d)) == pytest.approx(2.5, rel=1e-5)
  d = fourier.perturbation(b, jnp.array([1.0, -1.0, 1.0]), 8 / 255, norm='linf')
  assert float(jnp.max(jnp.abs(d))) == pytest.approx(8 / 255, rel=1e-6)


def test_bad_input_is_named():
  x = jnp.zeros((4, 8, 8))
  f = lambda im: im.reshape(im.shape[0], -1)[:, :3]
  with pytest.raises(ValueError, match='NHWC'):
    fourier.heat_map(f, x, jnp.zeros(4, int), 1.0)
  with pytest.raises(ValueError, match='eps'):
    fourier.heat_map(f, x[..., None], jnp.zeros(4, int), -1.0)
  with pytest.raises(ValueError, match="mode='random_sign' needs a PRNG key"):
    fourier.heat_map(f, x[..., None], jnp.zeros(4, int), 1.0)  # no silent default key
  with pytest.raises(ValueError, match='outside the 8x8 grid'):
    fourier.linf_of_unit_direction((8, 8), (8, 0))
  with pytest.raises(ValueError, match='>= 0'):
    fourier.perturbation(jnp.zeros((8, 8)), jnp.ones(1), -0.1)


def test_random_sign_mode_is_seeded_and_sees_both_signs(key):
  w = jax.random.normal(key, (4 * 4 * 1, 3))
  logits_fn = jax.jit(lambda im: im.reshape(im.shape[0], -1) @ w)
  x = jax.random.uniform(key, (16, 4, 4, 1))
  y = jnp.argmax(logits_fn(x), -1)
  a, _ = fourier.heat_map(logits_fn, x, y, 3.0, key=jax.random.key(1), batch=8, clip=None)
  b, _ = fourier.heat_map(logits_fn, x, y, 3.0, key=jax.random.key(1), batch=16, clip=None)
  assert a.shape == (1, 4, 4)
  np.testing.assert_array_equal(a, b)  # the signs do not depend on the batching
  c, _ = fourier.heat_map(logits_fn, x, y, 3.0, key=jax.random.key(1), chunk=3, clip=None)
  np.testing.assert_array_equal(a, c)
  # A loop over directions with the documented signs gives the same map.
  dirs = fourier.basis((4, 4), fourier.all_frequencies((4, 4)))
  for k in range(16):
    s = fourier.image_signs(k, 16, key=jax.random.key(1))
    wrong = jnp.argmax(logits_fn(x + 3.0 * s[:, None, None, None] * dirs[k][..., None]), -1) != y
    assert float(a.reshape(-1)[k]) == float(jnp.mean(wrong))
  # Each image gets +b or -b, so its error is at most that under +b plus that under -b.
  plus, _ = fourier.heat_map(logits_fn, x, y, 3.0, mode='per_channel', batch=16, clip=None)
  minus = jnp.stack(
    [jnp.mean(jnp.argmax(logits_fn(x - 3.0 * d[..., None]), -1) != y) for d in dirs]
  ).reshape(1, 4, 4)
  assert np.all(np.asarray(b) <= np.asarray(plus + minus) + 1e-6)
  assert np.asarray(b).max() > 0


class _CircularGapNet(nn.Module):
  """Circular padding, stride 1, ReLU, global average pooling: exactly shift-equivariant."""

  @nn.compact
  def __call__(self, x):
    for c in (6, 6):
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='wrap')
      x = nn.relu(nn.Conv(c, (3, 3), padding='VALID')(x))
    return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


def _attack_setup(key, shifts_closed=False):
  net = _CircularGapNet()
  base = jax.random.uniform(key, (6 if shifts_closed else 40, 6, 6, 2))
  if shifts_closed:  # every circular shift of every base image: a shift-closed set
    base = jnp.concatenate([jnp.roll(base, (i, j), (1, 2)) for i in range(6) for j in range(6)])
  params = net.init(key, base[:1])
  query = jax.jit(lambda im: jnp.argmax(net.apply(params, im), -1))
  return query, base


def test_attack_is_invariant_to_chunking_and_reports_a_fresh_rate(key):
  query, x = _attack_setup(key)
  a = fourier.fourier_attack(query, x, 1.5, chunk=7, batch=9)
  b = fourier.fourier_attack(query, x, 1.5, chunk=64, batch=40)
  assert (a.candidate, a.fooling_rate, a.queries) == (b.candidate, b.fooling_rate, b.queries)
  clean = query(x)
  assert a.fooling_rate == fourier.fooling_rate(query, x, a.perturbation, clean)
  assert a.fooling_rate > 0
  n_cand = 6 * 6 * 2**2
  assert a.queries == n_cand * 40 + 40  # every candidate on every image, plus clean labels
  assert float(jnp.linalg.norm(a.perturbation)) == pytest.approx(1.5, rel=1e-5)
  np.testing.assert_allclose(
    a.perturbation, fourier.candidate_perturbation((6, 6, 2), a.candidate, 1.5), atol=1e-7
  )
  # With given labels no clean queries are spent, and ties go to the lowest index.
  const = jax.jit(lambda im: jnp.zeros(im.shape[0], jnp.int32))
  c = fourier.fourier_attack(const, x, 1.5, labels=jnp.zeros(40, jnp.int32))
  assert (c.candidate, c.fooling_rate, c.queries) == (0, 0.0, n_cand * 40)


def test_halving_spends_fewer_queries_and_reports_a_fresh_rate(key):
  query, x = _attack_setup(key)
  full = fourier.fourier_attack(query, x, 1.5)
  half = fourier.fourier_attack(query, x, 1.5, search='halving', first_images=5, eta=3)
  assert half.queries < 0.5 * full.queries
  assert half.fooling_rate == fourier.fooling_rate(query, x, half.perturbation, query(x))
  assert half.fooling_rate <= full.fooling_rate


def test_shift_invariance_on_a_circular_gap_model(key):
  query, x = _attack_setup(key, shifts_closed=True)
  res = fourier.fourier_attack(query, x, 2.0)
  rates = fourier.shifted_fooling_rates(query, x, res.perturbation, query(x))
  assert rates.max() > 0
  np.testing.assert_array_equal(rates, np.full_like(rates, rates[0, 0]))


def test_whitebox_universal_stays_in_the_ball_and_beats_random(key):
  net = _CircularGapNet()
  x = jax.random.uniform(key, (64, 6, 6, 2))
  params = net.init(key, x[:1])
  logits_fn = lambda im: net.apply(params, im)
  query = jax.jit(lambda im: jnp.argmax(logits_fn(im), -1))
  y = query(x)
  delta = attacks.whitebox_universal(logits_fn, x, y, 1.5, key=key, steps=100, batch=32)
  assert float(jnp.linalg.norm(delta)) <= 1.5 * (1 + 1e-5)
  uap = fourier.fooling_rate(query, x, delta, y)
  rand = [
    fourier.fooling_rate(query, x, r, y)
    for r in attacks.random_perturbations((6, 6, 2), 1.5, 5, key=key)
  ]
  assert uap > max(rand)
  d_inf = attacks.whitebox_universal(logits_fn, x, y, 0.05, key=key, steps=20, norm='linf')
  assert float(jnp.max(jnp.abs(d_inf))) <= 0.05 + 1e-7


def test_shift_stride_subsamples_the_full_grid(key):
  query, x = _attack_setup(key)
  delta = fourier.candidate_perturbation((6, 6, 2), 37, 2.0)
  full = fourier.shifted_fooling_rates(query, x, delta, query(x))
  np.testing.assert_array_equal(
    fourier.shifted_fooling_rates(query, x, delta, query(x), stride=4), full[::4, ::4]
  )
  with pytest.raises(ValueError, match='stride'):
    fourier.shifted_fooling_rates(query, x, delta, query(x), stride=0)


def test_calibrate_eps_brackets_the_target(key):
  query, x = _attack_setup(key)
  y = query(x)
  sub = jax.random.fold_in(key, 5)
  eps, rate = fourier.calibrate_eps(query, x, y, key=sub, target=0.1, trials=4, iters=10)
  units = attacks.random_perturbations((6, 6, 2), 1.0, 4, key=sub)

  def mean_rate(e):
    return np.mean([fourier.fooling_rate(query, x, e * u, y) for u in units])

  # The returned norm meets the target with the baseline's own directions; slightly more
  # (one bisection step, of a bracket no wider than the doubled mean image norm) does not.
  mean_norm = float(jnp.mean(jnp.linalg.norm(x.reshape(len(x), -1), axis=1)))
  assert eps > 0 and rate == pytest.approx(mean_rate(eps)) and rate <= 0.1
  step = 2 ** math.ceil(math.log2(eps / mean_norm + 1)) * mean_norm / 2**10
  assert any(mean_rate(eps + k * step) > 0.1 for k in (1, 2))
  with pytest.raises(ValueError, match='target'):
    fourier.calibrate_eps(query, x, y, key=sub, target=1.5)
  with pytest.raises(ValueError, match='misclassified'):
    fourier.calibrate_eps(query, x, (y + 1) % 4, key=sub, target=0.1)


def test_heat_map_uses_every_image_whatever_the_batch(key):
  # Observed: 450 images with batch=256 gave the map of the first 256 only.
  w = jax.random.normal(key, (4 * 4 * 1, 3))
  logits_fn = jax.jit(lambda im: im.reshape(im.shape[0], -1) @ w)
  x = jax.random.uniform(key, (45, 4, 4, 1))
  y = jnp.arange(45) % 3
  hkey = jax.random.key(1)
  err, loss = fourier.heat_map(logits_fn, x, y, 3.0, key=hkey, batch=16, chunk=5)
  dirs = fourier.basis((4, 4), fourier.all_frequencies((4, 4)))
  for k in range(16):  # a per-image loop over all 45 images (16 does not divide 45)
    s = fourier.image_signs(k, 45, key=hkey)
    z = jnp.clip(x + 3.0 * s[:, None, None, None] * dirs[k][..., None], 0, 1)
    logits = logits_fn(z)
    wrong = [int(jnp.argmax(logits[i]) != y[i]) for i in range(45)]
    ce = [float(-jax.nn.log_softmax(logits[i])[y[i]]) for i in range(45)]
    assert round(float(err.reshape(-1)[k]) * 45) == sum(wrong)
    assert float(loss.reshape(-1)[k]) == pytest.approx(np.mean(ce), rel=1e-5)
  for b in (7, 45, 64):
    other, _ = fourier.heat_map(logits_fn, x, y, 3.0, key=hkey, batch=b, chunk=5)
    np.testing.assert_array_equal(np.asarray(other), np.asarray(err))


def test_attack_and_fooling_rates_count_every_image(key):
  w = jax.random.normal(key, (4 * 4 * 1, 3))
  query = jax.jit(lambda im: jnp.argmax(im.reshape(im.shape[0], -1) @ w, -1))
  x = jax.random.uniform(key, (45, 4, 4, 1))
  ref = query(x)
  res = fourier.fourier_attack(query, x, 1.5, labels=ref, batch=16, chunk=7)
  fooled = np.mean(np.asarray(query(jnp.clip(x + res.perturbation, 0, 1)) != ref))
  assert res.fooling_rate == pytest.approx(fooled)
  assert fourier.fooling_rate(query, x, res.perturbation, ref, batch=16) == pytest.approx(fooled)


def test_bad_images_and_labels_are_refused_by_name(key):
  # Observed: a nan image was heat-mapped without complaint.
  f = jax.jit(lambda im: im.reshape(im.shape[0], -1)[:, :3])
  x = np.asarray(jax.random.uniform(key, (6, 4, 4, 1)))
  y = np.zeros(6, np.int32)
  nan = x.copy()
  nan[4, 1, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r'images\[4, 1, 2, 0\] is nan; expected finite'):
    fourier.heat_map(f, nan, y, 1.0, key=key)
  with pytest.raises(ValueError, match=r'images\[4, 1, 2, 0\] is nan'):
    fourier.fooling_rate(lambda im: jnp.argmax(f(im), -1), nan, 0.0, y)
  bad = x.copy()
  bad[2, 0, 0, 0] = 1.5
  with pytest.raises(ValueError, match=r'images\[2, 0, 0, 0\] = 1.5 is outside \[0, 1\]'):
    fourier.heat_map(f, bad, y, 1.0, key=key)
  fourier.heat_map(f, bad, y, 1.0, key=key, clip=None)  # no pixel space, no range check
  with pytest.raises(ValueError, match=r'labels\[5\] = 3 is outside \[0, 3\)'):
    fourier.heat_map(f, x, np.array([0, 1, 2, 0, 1, 3]), 1.0, key=key)
  with pytest.raises(ValueError, match='labels has 5 entries for 6 images'):
    fourier.heat_map(f, x, y[:5], 1.0, key=key)
