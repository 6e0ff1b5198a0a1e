"""The shared training loop (`loop.run`), progress lines and TensorBoard scalars."""

import glob
import json
import os
import shutil
import struct
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsuzuku_jax import loop, progress


class Counter(NamedTuple):
  step: jax.Array
  total: jax.Array


@jax.jit
def _step(state, batch):
  total = state.total + jnp.sum(batch)
  return Counter(state.step + 1, total), {'loss': total, 'accuracy': jnp.float32(0.5)}


def _batches(epoch):  # 4 batches per epoch, depending only on the epoch
  return [jnp.full((2,), 10.0 * epoch + i) for i in range(4)]


def _start():
  return Counter(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))


SCHEDULE = loop.Schedule(steps=10, per_epoch=4, log_every=3, checkpoint_every=4)


def _records(path):
  return [{k: v for k, v in r.items() if k != 'time'} for r in loop.read_records(path)]


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
  lines = []
  full, recs = loop.run(_start(), _step, _batches, SCHEDULE, str(tmp_path / 'a'), log=lines.append)
  assert [r['step'] for r in recs] == [3, 4, 6, 8, 9, 10]  # log steps, checkpoints, the end
  assert _records(tmp_path / 'a') == [{k: v for k, v in r.items() if k != 'time'} for r in recs]
  # Interrupted after step 8's checkpoint: the lines past it are dropped, the steps redone.
  half = loop.Schedule(**{**SCHEDULE.__dict__, 'steps': 9})
  b = str(tmp_path / 'b')
  loop.run(_start(), _step, _batches, half, b, log=lines.append)
  shutil.rmtree(os.path.join(b, 'checkpoints', '9'))
  resumed, recs_b = loop.run(_start(), _step, _batches, SCHEDULE, b, log=lines.append)
  assert any('resumed from' in line and 'at step 8' in line for line in lines)
  assert float(resumed.total) == float(full.total) and int(resumed.step) == 10
  assert [r['step'] for r in recs_b] == [3, 4, 6, 8, 9, 10]
  assert _records(b) == _records(tmp_path / 'a')
  # The progress line: steps done, the shown metrics, a rate and an ETA.
  assert any(line.startswith('step 10/10 loss') and 'ETA' in line for line in lines), lines


def test_without_a_workdir_nothing_is_written_and_divergence_stops(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state, recs = loop.run(_start(), _step, _batches, SCHEDULE, None, log=lambda s: None)
  assert int(state.step) == 10 and len(recs) == 6 and os.listdir(tmp_path) == []

  @jax.jit
  def bad(state, batch):
    new, m = _step(state, batch)
    return new, {**m, 'loss': jnp.where(new.step >= 5, jnp.nan, m['loss'])}

  with pytest.raises(loop.TrainingDiverged, match='at step 6.*last good checkpoint .step 4'):
    loop.run(_start(), bad, _batches, SCHEDULE, str(tmp_path / 'w'), log=lambda s: None)
  with pytest.raises(loop.TrainingDiverged, match='at step 6.*nothing was saved .no workdir'):
    loop.run(_start(), bad, _batches, SCHEDULE, None, log=lambda s: None)


def test_on_log_fields_and_until(tmp_path):
  seen = []

  def on_log(step, state, window):
    seen.append((step, len(window)))
    return {'window_steps': len(window), 'note': 'kept'}

  state, recs = loop.run(
    _start(), _step, _batches, SCHEDULE, str(tmp_path), on_log=on_log, log=lambda s: None,
    until=lambda s: int(s.step) >= 6,
  )  # fmt: skip
  assert int(state.step) == 6 and seen == [(3, 3), (4, 1), (6, 2)]
  assert recs[-1]['note'] == 'kept' and recs[-1]['window_steps'] == 2
  # A resumed run whose checkpoint meets `until` returns at once.
  again, recs2 = loop.run(_start(), _step, _batches, SCHEDULE, str(tmp_path), log=lambda s: None,
                          until=lambda s: int(s.step) >= 6)  # fmt: skip
  assert int(again.step) == 6 and [r['step'] for r in recs2] == [3, 4, 6]


def test_progress_rate_and_eta_leave_out_the_first_unit():
  now = [0.0]
  lines = []
  bar = progress.Progress('heat map', 5, unit='batches', every=0.0, log=lines.append,
                          clock=lambda: now[0])  # fmt: skip
  now[0] = 30.0  # the first batch compiled for 30 s
  bar.update(1)
  assert lines[-1] == 'heat map 1/5 compiled'
  for done in (2, 3):
    now[0] += 2.0
    bar.update(done)
  assert lines[-1] == 'heat map 3/5 0.5 batches/s ETA 4s'  # 2 s per batch, not 34 / 3
  # Every 60 s: a phase that ends within a minute prints nothing; a longer one prints once a
  # minute and its end.
  quiet = progress.Progress('x', 100, every=60.0, log=lines.append, clock=lambda: now[0])
  n = len(lines)
  for done in range(1, 101):
    quiet.update(done)
  assert len(lines) == n
  slow = progress.Progress('y', 100, every=60.0, log=lines.append, clock=lambda: now[0])
  for done in range(1, 101):
    now[0] += 1.0
    slow.update(done)
  assert lines[n:] == ['y 60/100 1 steps/s ETA 40s', 'y 100/100 1 steps/s ETA 0s']
  with pytest.raises(ValueError, match='start=5, total=3'):
    progress.Progress('x', 3, start=5)


def _tfrecords(path):
  """The records of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
  out = []
  with open(path, 'rb') as f:
    while header := f.read(12):
      (n,) = struct.unpack('<Q', header[:8])
      out.append(f.read(n))
      f.read(4)
  return out


def test_scalars_are_tensorboard_events(tmp_path):
  from tensorboardX.proto import event_pb2

  with progress.Scalars(str(tmp_path)) as board:
    board.write(3, {'loss': 0.5, 'accuracy': np.float32(0.25)})
    board.write(6, {'loss': 0.25})
  events = []
  for path in glob.glob(str(tmp_path / 'events.out.tfevents.*')):
    for raw in _tfrecords(path):
      e = event_pb2.Event()
      e.ParseFromString(raw)
      events += [(e.step, v.tag, v.simple_value) for v in e.summary.value]
  assert sorted(events) == [(3, 'accuracy', 0.25), (3, 'loss', 0.5), (6, 'loss', 0.25)]
  progress.Scalars(None).write(1, {'loss': 1.0})  # no logdir: a no-op


def test_training_writes_tensorboard_beside_metrics(tmp_path):
  loop.run(_start(), _step, _batches, SCHEDULE, str(tmp_path), log=lambda s: None)
  assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
  assert json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[0])['step'] == 3
