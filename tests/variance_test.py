"""Variance estimates of the minibatch-mean gradient against the per-example oracle."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tsuzuku_jax import models
from tsuzuku_jax.vgc import variance


def _setup(model, shape, key, dtype=jnp.float64):
  x = jax.random.uniform(key, shape, dtype)
  y = jnp.arange(shape[0]) % 5
  params = model.init(jax.random.key(0), x[:1])['params']
  params = jax.tree.map(lambda a: a.astype(dtype), params)

  def loss_fn(p, b):
    logits = model.apply({'params': p}, b['image'])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b['label']))
    return loss, jnp.mean(jnp.argmax(logits, -1) == b['label'])

  return loss_fn, params, {'image': x, 'label': y}


MODELS = {
  'mlp': (models.MLP(num_classes=5, hidden=(7, 6)), (6, 4, 4, 1)),
  'cnn': (models.CNN(num_classes=5, channels=(3, 4), dense=6, batch_norm=False), (6, 8, 8, 2)),
}


def _close(a, b, rtol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-300)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_cheap_and_microbatch_of_one_match_oracle(name, key):
  with jax.enable_x64(True):
    loss_fn, params, batch = _setup(*MODELS[name], key)
    oracle = jax.jit(lambda p, b: variance.per_example(loss_fn, p, b))(params, batch)
    cheap = jax.jit(lambda p, b: variance.cheap(loss_fn, p, b))(params, batch)
    micro = jax.jit(lambda p, b: variance.microbatch(loss_fn, p, b, 6))(params, batch)
    for est in (cheap, micro):
      _close(est[2], oracle[2], 1e-10)
      _close(est[1], oracle[1], 1e-10)
      np.testing.assert_allclose(est[0][0], oracle[0][0], rtol=1e-12)


def test_cheap_matches_oracle_in_float32(key):
  loss_fn, params, batch = _setup(*MODELS['mlp'], key, dtype=jnp.float32)
  cheap = jax.jit(lambda p, b: variance.cheap(loss_fn, p, b)[2])(params, batch)
  oracle = jax.jit(lambda p, b: variance.per_example(loss_fn, p, b)[2])(params, batch)
  _close(cheap, oracle, 1e-4)


def test_microbatch_estimate_is_unbiased(key):
  """Averaged over random batches, micro-batches of 4 estimate the oracle's s."""
  with jax.enable_x64(True):
    model = models.MLP(num_classes=5, hidden=(4,))
    loss_fn, params, _ = _setup(model, (1, 3, 3, 1), key)
    pool_x = jax.random.uniform(jax.random.key(7), (4096, 3, 3, 1), jnp.float64)
    pool_y = jax.random.randint(jax.random.key(8), (4096,), 0, 5)

    @jax.jit
    def both(k):
      idx = jax.random.choice(k, 4096, (16,), replace=False)
      b = {'image': pool_x[idx], 'label': pool_y[idx]}
      return variance.per_example(loss_fn, params, b)[2], variance.microbatch(
        loss_fn, params, b, 4
      )[2]

    keys = jax.random.split(jax.random.key(3), 400)
    oracle, micro = jax.lax.map(both, keys)
    o = np.concatenate([np.asarray(a).reshape(400, -1) for a in jax.tree.leaves(oracle)], 1)
    m = np.concatenate([np.asarray(a).reshape(400, -1) for a in jax.tree.leaves(micro)], 1)
    diff = m - o
    se = diff.std(0) / np.sqrt(400) + 1e-30
    z = np.abs(diff.mean(0)) / se
    keep = o.mean(0) > 1e-12
    assert np.mean(z[keep] < 4) > 0.98  # no systematic bias beyond sampling error
    assert np.median(np.abs(m.mean(0) - o.mean(0))[keep] / o.mean(0)[keep]) < 0.1


def test_cheap_names_unsupported_parameters(key):
  class WithBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4)(x.reshape(x.shape[0], -1))
      return nn.Dense(3)(nn.LayerNorm()(x))

  m = WithBN()
  x = jnp.ones((4, 2, 2, 1))
  params = m.init(key, x)['params']
  loss_fn = lambda p, b: (jnp.mean(m.apply({'params': p}, b['image'])), 0.0)
  with pytest.raises(ValueError, match='LayerNorm_0'):
    variance.cheap(loss_fn, params, {'image': x})
  # The micro-batch estimator handles any layer.
  s = jax.jit(lambda p: variance.microbatch(loss_fn, p, {'image': x}, 2)[2])(params)
  assert all(np.all(np.asarray(a) >= 0) for a in jax.tree.leaves(s))


def test_bad_microbatch_count(key):
  loss_fn, params, batch = _setup(*MODELS['mlp'], key, dtype=jnp.float32)
  with pytest.raises(ValueError, match='num_microbatches'):
    variance.microbatch(loss_fn, params, batch, 4)  # 4 does not divide 6
  with pytest.raises(ValueError, match='estimator'):
    variance.estimator('exact')
