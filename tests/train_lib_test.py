"""Training loop: resume equals an uninterrupted run, NaN stops cleanly, sharded == unsharded."""

import json
import os

import jax
import numpy as np
import pytest

from tsuzuku_jax import data, lmt, loop, models, train_lib


@pytest.fixture(scope='module')
def digits():
  return data.load('digits', 'train')


def _config(**kw):
  base = dict(steps=50, batch_size=64, log_every=5, checkpoint_every=20, seed=3)
  return train_lib.TrainConfig(**{**base, **kw})


def _lmt(model):
  """LMT's margin loss: a loss with state (the power-iteration vectors) the trainer carries."""
  return lmt.training_loss(train_lib.apply_fn(model), (8, 8, 1), c=0.3, c_warmup_steps=10)


def _train(model, config, x, y, workdir, **kw):
  kw.setdefault('loss', _lmt(model))
  return train_lib.train(model, config, x, y, workdir, **kw)


def _small_cnn():
  return models.CNN(channels=(4, 8), dense=16, batch_norm=True)


class _Interrupt(Exception):
  pass


def _interrupt_at(step):
  def log(line):
    if line.startswith('step ') and int(line.split()[1].split('/')[0]) >= step:
      raise _Interrupt(line)

  return log


def _assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_matches_uninterrupted_run(tmp_path, digits):
  x, y = digits
  model, config = _small_cnn(), _config()
  full = _train(model, config, x, y, str(tmp_path / 'full'), log=lambda s: None)
  # Killed at step 50, after step 45 was logged: the last checkpoint is step 40, in the middle
  # of epoch 1 (21 steps per epoch), so resuming must also skip the batches already seen in
  # that epoch. The kill also cut a metrics line in half.
  with pytest.raises(_Interrupt):
    _train(model, config, x, y, str(tmp_path / 'cut'), log=_interrupt_at(50))
  with open(tmp_path / 'cut' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 50, "lo')
  lines = []
  resumed = _train(model, config, x, y, str(tmp_path / 'cut'), log=lines.append)
  assert lines[0].startswith('resumed') and 'step 40' in lines[0]
  assert int(resumed.step) == int(full.step) == 50
  _assert_same_state(full, resumed)
  # Observed: the steps redone after the checkpoint (45 here) were logged twice.
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'cut' / 'metrics.jsonl')]
  assert steps == list(range(5, 55, 5))
  # The power-iteration vectors and BN statistics are part of the state and were restored.
  assert jax.tree.leaves(resumed.loss_state) and jax.tree.leaves(resumed.batch_stats)


def test_metrics_jsonl_and_progress_line(tmp_path, digits):
  x, y = digits
  lines = []
  _train(models.MLP(hidden=(16,)), _config(steps=10), x, y, str(tmp_path), log=lines.append)
  records = [json.loads(s) for s in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [5, 10]
  assert {'loss', 'accuracy', 'c', 'lipschitz_estimate', 'grad_norm'} <= set(records[0])
  assert 'steps/s' in lines[-1] and 'ETA' in lines[-1] and 'loss' in lines[-1]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits):
  x, y = digits
  model, workdir, config = models.MLP(hidden=(16,)), str(tmp_path), _config(steps=40)
  # A huge (finite) image, first shown at step 21 (the data order of epoch 0), overflows the
  # logits there: the loss is nan from step 21 on, after the checkpoint at step 20.
  order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(3), 0), len(x)))
  assert config.seed == 3 and 21 * 64 <= len(x)
  bad = x.copy()
  bad[order[20 * 64]] = 3e38
  with pytest.raises(train_lib.TrainingDiverged, match='step 25.*last good checkpoint'):
    _train(model, config, bad, y, workdir, log=lambda s: None)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['20']
  state, _ = train_lib.create_state(model, _config(), x.shape[1:], _lmt(model))
  restored = loop.restore_latest(workdir, state)
  assert int(restored.step) == 20
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(restored.params))


def test_sharded_training_matches_single_device(tmp_path, digits):
  x, y = digits
  model, config = _small_cnn(), _config(steps=8, checkpoint_every=100)
  one = _train(model, config, x, y, str(tmp_path / 'one'), log=lambda s: None)
  mesh = data.data_mesh()
  assert mesh.devices.size == 8
  eight = _train(model, config, x, y, str(tmp_path / 'eight'), mesh=mesh, log=lambda s: None)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match='batch_size'):
    train_lib.TrainConfig(batch_size=0)
  apply_fn = train_lib.apply_fn(models.MLP(hidden=(16,)))
  with pytest.raises(ValueError, match='c must be positive'):
    lmt.training_loss(apply_fn, (8, 8, 1), c=-1.0)
  with pytest.raises(ValueError, match='form must be one of'):
    lmt.training_loss(apply_fn, (8, 8, 1), c=0.3, form='spectral')


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path, digits):
  x, y = digits
  config = _config(steps=5, checkpoint_every=5)
  _train(models.MLP(hidden=(16,)), config, x, y, str(tmp_path), log=lambda s: None)
  record = (tmp_path / 'run.json').read_bytes()
  with pytest.raises(ValueError, match='with model.hidden=16; this one has model.hidden=32'):
    _train(models.MLP(hidden=(32,)), config, x, y, str(tmp_path), log=lambda s: None)
  assert os.listdir(tmp_path / 'checkpoints') == ['5']
  assert (tmp_path / 'run.json').read_bytes() == record
  # Restoring another model's checkpoint directly is refused too, before orbax reads anything.
  other = models.MLP(hidden=(32,))
  other, _ = train_lib.create_state(other, config, x.shape[1:], _lmt(other))
  with pytest.raises(train_lib.CheckpointMismatch, match='does not match this model'):
    loop.restore_latest(str(tmp_path), other)


def test_until_stops_at_a_logging_step_and_a_resume_returns_at_once(tmp_path, digits):
  x, y = digits
  config = _config(steps=40, schedule='constant', log_every=5, checkpoint_every=100)
  model = models.MLP(hidden=(16,))
  plain = train_lib.CROSS_ENTROPY
  full = _train(model, config, x, y, str(tmp_path / 'full'), loss=plain, log=lambda s: None)
  calls = []

  def until(state):
    calls.append(int(state.step))
    return int(state.step) >= 15

  stopped = _train(
    model, config, x, y, str(tmp_path / 'cut'), loss=plain, log=lambda s: None, until=until
  )
  assert int(stopped.step) == 15 and calls == [5, 10, 15]
  # The stop was checkpointed; resuming with the same criterion trains nothing more.
  lines = []
  again = _train(
    model, config, x, y, str(tmp_path / 'cut'), loss=plain, log=lines.append, until=until
  )
  assert int(again.step) == 15 and lines == [
    'resumed from ' + str(tmp_path / 'cut') + '/checkpoints at step 15'
  ]
  _assert_same_state(stopped.params, again.params)
  # Without the criterion the run continues from the stop to the same end as an unbroken run.
  rest = _train(model, config, x, y, str(tmp_path / 'cut'), loss=plain, log=lambda s: None)
  _assert_same_state(full, rest)
