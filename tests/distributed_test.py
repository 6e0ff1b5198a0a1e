"""Multi-process jobs on local processes: 2 processes x 4 CPU devices (gloo collectives) form
one 8-device job; a global batch put by `data.shard_batch` is the same array as on one process,
and processes started with other settings are refused on every process."""

import json

import pytest
from multiprocess import run_processes

from tsuzuku_jax import distributed
from tsuzuku_jax.checks import InvalidInput

JOB = """
import json, os
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from tsuzuku_jax import data, distributed
from tsuzuku_jax.checks import InvalidInput

pid = int(os.environ['PROCESS_ID'])
multi = distributed.initialize(
  f"127.0.0.1:{os.environ['PORT']}", int(os.environ['NUM_PROCESSES']), pid, heartbeat_timeout_s=20
)
batch = {'image': np.arange(64 * 3, dtype=np.float32).reshape(64, 3),
         'label': np.arange(64, dtype=np.int32) % 10}
sharded = data.shard_batch(batch, data.data_mesh())
weights = jnp.arange(1.0, 4.0)
total = float(jax.jit(lambda b: jnp.sum(b['image'] * weights) + jnp.sum(b['label']))(sharded))
whole = np.asarray(multihost_utils.process_allgather(sharded['image'], tiled=True))
distributed.check_same({'steps': 30, 'lr': 0.1})
try:
  distributed.check_same({'steps': 30 + pid})
  refused = None
except InvalidInput as e:
  refused = str(e)
print(json.dumps({'multi': multi, 'devices': jax.device_count(), 'local': jax.local_device_count(),
                  'total': total, 'same': bool(np.array_equal(whole, batch['image'])),
                  'local_shards': len(sharded['image'].addressable_shards), 'refused': refused}))
"""


def test_two_processes_share_one_global_batch_and_refuse_other_settings(tmp_path):
  procs = run_processes(JOB, tmp_path, n=2, devices=4)
  rows = []
  for p in procs:
    assert p.returncode == 0, p.stderr[-3000:]
    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
  image = [[3 * r + c for c in range(3)] for r in range(64)]
  want = sum(v * (c + 1) for row in image for c, v in enumerate(row)) + sum(
    r % 10 for r in range(64)
  )
  for row in rows:
    assert row['multi'] and row['devices'] == 8 and row['local'] == 4 and row['local_shards'] == 4
    assert row['same'] and row['total'] == pytest.approx(want)
    assert row['refused'] == (
      'processes [1] were started with other settings than process 0: run the same command on '
      'every host'
    )


def test_initialize_needs_all_three_or_nothing():
  assert distributed.initialize() is False  # a single-process run: nothing to join
  with pytest.raises(InvalidInput, match='num_processes, process_id missing'):
    distributed.initialize('127.0.0.1:1234')
  with pytest.raises(InvalidInput, match=r'process_id must be in \[0, 2\), got 2'):
    distributed.initialize('127.0.0.1:1234', 2, 2)
  assert distributed.digest({'a': 1, 'b': 2}) == distributed.digest({'b': 2, 'a': 1})


TRAIN = """
import json, os
import jax, numpy as np
from jax.flatten_util import ravel_pytree
from tsuzuku_jax import data, distributed, models, train_lib

distributed.initialize(f"127.0.0.1:{os.environ['PORT']}", int(os.environ['NUM_PROCESSES']),
                       int(os.environ['PROCESS_ID']), heartbeat_timeout_s=20)
x, y = data.load('digits', 'train')
config = train_lib.TrainConfig(steps=20, batch_size=128, log_every=10, checkpoint_every=10)
state = train_lib.train(models.MLP(10, (32,)), config, x, y, 'run', mesh=data.data_mesh())
flat = np.asarray(ravel_pytree(jax.device_get(state.params))[0])
np.save(f'params{jax.process_index()}.npy', flat)
print(json.dumps({'step': int(state.step)}))
"""


def test_training_on_two_processes_equals_one_process_on_as_many_devices(tmp_path):
  # The same global batches in the same order; process 0 alone writes the run's shared files.
  import jax
  import numpy as np
  from jax.flatten_util import ravel_pytree

  from tsuzuku_jax import data, models, train_lib

  for attempt in ('first', 'again'):  # the second finds the run complete and resumes it
    procs = run_processes(TRAIN, tmp_path, n=2, devices=4)
    for p in procs:
      assert p.returncode == 0, p.stderr[-3000:]
      assert json.loads(p.stdout.strip().splitlines()[-1]) == {'step': 20}
    shown = [[line for line in p.stdout.splitlines() if line.startswith('step ')] for p in procs]
    assert len(shown[0]) == (2 if attempt == 'first' else 0) and shown[1] == [], shown
  run = tmp_path / 'run'
  steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [10, 20]
  assert len(list((run / 'tensorboard').iterdir())) == 2  # one event file per invocation
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['10', '20']
  p0, p1 = (np.load(tmp_path / f'params{i}.npy') for i in (0, 1))
  np.testing.assert_array_equal(p0, p1)
  # One process on this process's 8 devices: equal to float32 rounding (another summation
  # order across the processes).
  x, y = data.load('digits', 'train')
  config = train_lib.TrainConfig(steps=20, batch_size=128, log_every=10, checkpoint_every=10)
  state = train_lib.train(
    models.MLP(10, (32,)), config, x, y, str(tmp_path / 'one'), mesh=data.data_mesh(),
    log=lambda line: None,
  )  # fmt: skip
  assert jax.device_count() == 8
  one = np.asarray(ravel_pytree(jax.device_get(state.params))[0])
  np.testing.assert_allclose(p0, one, rtol=0, atol=1e-6)
