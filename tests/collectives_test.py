"""Compressed all-reduce against dense psum; 8 devices against a simulation; the cost model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tsuzuku_jax import data, models, vgc
from tsuzuku_jax.vgc import allreduce, compression, cost_model
from tsuzuku_jax.vgc import data_parallel as dp

N = 8


def _mesh():
  assert jax.device_count() == N, 'conftest sets 8 fake CPU devices'
  return data.data_mesh()


def _grads(key, dyadic=False):
  k1, k2 = jax.random.split(key)
  g = {'w': jax.random.normal(k1, (N, 33, 7)), 'b': jax.random.normal(k2, (N, 7))}
  if dyadic:  # multiples of 2^-8 below 2^4: every summation order is exact in float32
    g = jax.tree.map(lambda a: jnp.round(a * 256) / 256, g)
  return g


def _exchange(comp, grads, variances, simulate):
  like = jax.tree.map(lambda a: a[0], grads)

  def worker(g, s):
    state = comp.init(like)
    msgs, _, _ = comp.update(g, state, s)
    return allreduce.mean_of_messages(msgs, like, 'data'), jax.lax.psum(g, 'data')

  if simulate:
    mean, total = jax.vmap(worker, axis_name='data')(grads, variances)
    return jax.tree.map(lambda a: a[0], mean), jax.tree.map(lambda a: a[0], total)

  def local(g, s):
    sq = lambda t: jax.tree.map(lambda a: a[0], t)
    return worker(sq(g), sq(s))

  f = jax.shard_map(
    local, mesh=_mesh(), in_specs=(P('data'), P('data')), out_specs=(P(), P()), check_vma=False
  )
  return jax.jit(f)(grads, variances)


@pytest.mark.parametrize('simulate', [False, True])
@pytest.mark.parametrize('dyadic', [False, True])
def test_send_everything_equals_dense_psum(simulate, dyadic, key):
  comp = compression.make('vgc', alpha=0.0, capacity=1.0, quantize=False)
  grads = _grads(key, dyadic)
  var = jax.tree.map(jnp.ones_like, grads)
  mean, total = _exchange(comp, grads, var, simulate)
  dense = jax.tree.map(lambda t: t / N, total)
  for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(dense), strict=True):
    if dyadic:
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  expect = jax.tree.map(lambda a: jnp.mean(a, 0), grads)
  for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(expect), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sparse_exchange_equals_mean_of_decoded_messages(key):
  """Quantised, capacity-limited messages: the all-gather path equals decoding each worker's."""
  comp = compression.make('vgc', alpha=1.0, capacity=0.1)
  grads = _grads(key)
  var = jax.tree.map(lambda a: 0.2 * jnp.ones_like(a), grads)
  mean, _ = _exchange(comp, grads, var, simulate=False)
  like = jax.tree.map(lambda a: a[0], grads)
  decoded = []
  for w in range(N):
    g_w = jax.tree.map(lambda a, w=w: a[w], grads)
    s_w = jax.tree.map(lambda a, w=w: a[w], var)
    msgs, _, _ = comp.update(g_w, comp.init(like), s_w)
    decoded.append(
      {k: compression.decode(msgs[k], like[k].size).reshape(like[k].shape) for k in msgs}
    )
  ref = jax.tree.map(lambda *a: sum(a) / N, *decoded)
  for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _digits_problem():
  x, y = data.load('digits', 'train')
  model = models.MLP(num_classes=10, hidden=(32,))
  params = model.init(jax.random.key(0), x[:1])['params']

  def loss_fn(p, b):
    logits = model.apply({'params': p}, b['image'])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b['label']))
    return loss, jnp.mean(jnp.argmax(logits, -1) == b['label'])

  return loss_fn, params, x, y


@pytest.mark.parametrize('method', ['vgc', 'topk'])
def test_eight_devices_equal_single_device_simulation(method):
  loss_fn, params, x, y = _digits_problem()
  results = []
  for simulate in (False, True):
    config = dp.DPConfig(method=method, simulate=simulate, steps=4, batch_size=64, density=0.01)
    state, tx = dp.init_state(config, params)
    state = dp.place(state, config, None if simulate else _mesh())
    step = dp.make_train_step(loss_fn, config, tx, None if simulate else _mesh())
    for t in range(4):
      batch = {'image': x[64 * t : 64 * (t + 1)], 'label': y[64 * t : 64 * (t + 1)]}
      if not simulate:
        batch = data.shard_batch(batch, _mesh())
      state, metrics = step(state, batch)
    results.append((state, metrics))
  (a, ma), (b, mb) = results
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
  for k in ma:
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5)
  assert 0 < float(ma['sent']) < float(ma['elements'])  # a real sparse exchange took place
  comp = [s for s in a.workers if isinstance(s, vgc.CompressTxState)][0]
  assert np.asarray(comp.inner.residual['dense0']['kernel']).shape[0] == N


def test_mesh_axis_and_worker_count_are_checked():
  loss_fn, params, _, _ = _digits_problem()
  config = dp.DPConfig(method='vgc', workers=N)
  tx = dp.make_optimizer(config)
  wrong = jax.make_mesh((N,), ('batch',))
  with pytest.raises(ValueError, match="no axis 'data'"):
    dp.make_train_step(loss_fn, config, tx, wrong)
  with pytest.raises(ValueError, match='workers=4'):
    dp.make_train_step(loss_fn, dp.DPConfig(workers=4, batch_size=64), tx, _mesh())
  with pytest.raises(ValueError, match='batch_size'):
    dp.DPConfig(workers=8, batch_size=100)
  with pytest.raises(ValueError, match='zeta'):
    dp.DPConfig(zeta=1.01)
  with pytest.raises(ValueError, match='microbatches'):
    dp.DPConfig(estimator='microbatch', microbatches=3)  # does not divide 128 / 8


def test_cost_model_closed_forms():
  d, n, bw = 4e8, 8, 1e9
  assert cost_model.ring_allreduce_time(d, n, bw, 0.0) == pytest.approx(2 * 7 / 8 * d / bw)
  assert cost_model.ring_allgather_time(d / 4, n, bw, 0.0) == pytest.approx(7 * d / 4 / bw)
  # R = n / 2: the all-gather moves exactly as many bytes as the ring all-reduce.
  m = cost_model.StepModel(dense_bytes=d, sparse_bytes=d / 4, workers=n, t_compute=0.1, latency=0)
  assert cost_model.step_times(m, bw)['comm_speedup'] == pytest.approx(1.0)
  # Break-even: the compressed and dense steps take the same time there.
  m = cost_model.StepModel(d, d / 100, n, t_compute=0.1, t_compress=0.01, t_variance=0.002)
  b_star, side = cost_model.break_even_bandwidth(m)
  assert side == 'below'
  row = cost_model.step_times(m, b_star)
  assert row['t_dense_step'] == pytest.approx(row['t_compressed_step'])
  assert (
    cost_model.step_times(m, b_star / 2)['speedup']
    > 1
    > cost_model.step_times(m, 2 * b_star)['speedup']
  )
  table = cost_model.speedup_table(m)
  assert [r['bandwidth_gbit'] for r in table['rows']] == pytest.approx([1, 10, 100])
  assert table['allgather_wins_bytes']
  # Never wins when R < n / 2 and compression costs time.
  bad = cost_model.StepModel(d, d / 2, n, t_compute=0.1, t_compress=0.01)
  assert cost_model.break_even_bandwidth(bad) == (0.0, 'never')
  # More bytes than dense but fewer latency hops: faster only above the break-even bandwidth.
  odd = cost_model.StepModel(1e3, 1e3, n, t_compute=0.0, latency=1e-3)
  b_star, side = cost_model.break_even_bandwidth(odd)
  assert side == 'above'
  assert (
    cost_model.step_times(odd, 2 * b_star)['speedup']
    > 1
    > cost_model.step_times(odd, b_star / 2)['speedup']
  )


class _Interrupt(Exception):
  pass


def _interrupt(line):
  if line.startswith('vgc 6/6'):  # after step 6 is logged, before its checkpoint is saved
    raise _Interrupt(line)


def test_training_resumes_inside_a_run_with_the_uninterrupted_history(tmp_path):
  # The shared loop's checkpoints: a run stopped after its step-4 checkpoint and restarted ends
  # with the parameters and the byte / accuracy history of a run that was never stopped.
  loss_fn, params, x, y = _digits_problem()
  apply_fn = lambda p, z: models.MLP(10, hidden=(32,)).apply({'params': p}, z)  # noqa: E731
  config = dp.DPConfig(method='vgc', simulate=True, steps=6, batch_size=64, eval_every=2,
                       checkpoint_every=4)  # fmt: skip
  args = (loss_fn, apply_fn, params, config, (x, y), (x, y))
  full, hist = dp.train(*args, workdir=str(tmp_path / 'a'), log=lambda s: None)
  with pytest.raises(_Interrupt):
    dp.train(*args, workdir=str(tmp_path / 'b'), log=_interrupt)
  lines = []
  again, hist_b = dp.train(*args, workdir=str(tmp_path / 'b'), log=lines.append)
  assert any('resumed' in line and 'step 4' in line for line in lines), lines
  for u, v in zip(jax.tree.leaves(full), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(u, v)
  assert hist_b == hist and len(hist['density']) == 6 and hist['eval_step'] == [2, 4, 6]
  assert hist['totals']['elements'] > hist['totals']['sent'] > 0
