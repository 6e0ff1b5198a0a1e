"""Multi-process jobs on local processes: 2 processes x 4 CPU devices (gloo collectives) form
one 8-device job; a global batch put by `data.shard_batch` is the same array as on one process,
processes started with other settings are refused on every process, and a killed process
stops the others with one line; the job then resumes."""

import json
import os
import re
import time

import numpy as np
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


def test_multi_host_schedulers_are_recognised_from_their_environment():
  assert distributed.detect({}) is None
  assert distributed.detect({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == 'SLURM'
  assert distributed.detect({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None  # one task
  assert distributed.detect({'OMPI_COMM_WORLD_SIZE': '2'}) == 'Open MPI'
  assert distributed.detect({'TPU_WORKER_HOSTNAMES': 'a,b'}) == 'Cloud TPU pod (GKE)'
  assert distributed.detect({'TPU_WORKER_HOSTNAMES': 'a'}) is None  # a single host


TRAIN = """
import json, os, signal
import jax, numpy as np
from jax.flatten_util import ravel_pytree
from tsuzuku_jax import data, distributed, models, train_lib

distributed.initialize(f"127.0.0.1:{os.environ['PORT']}", int(os.environ['NUM_PROCESSES']),
                       int(os.environ['PROCESS_ID']), heartbeat_timeout_s=5)
kill_at = int(os.environ.get('KILL_AT', 0))  # process 1 is killed at this logging step


def until(state):
  if jax.process_index() == 1 and int(state.step) == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  return False


x, y = data.load('digits', 'train')
config = train_lib.TrainConfig(steps=30, batch_size=128, log_every=10, checkpoint_every=10)
state = train_lib.train(models.MLP(10, (32,)), config, x, y, os.environ['RUN'],
                        mesh=data.data_mesh(), until=until)
flat = np.asarray(ravel_pytree(jax.device_get(state.params))[0])
np.save(os.path.join(os.environ['RUN'], f'params{jax.process_index()}.npy'), flat)
distributed.finish()
print(json.dumps({'step': int(state.step)}))
"""


def _train(tmp_path, run: str, kill_at: int = 0):
  os.environ.update(RUN=str(tmp_path / run), KILL_AT=str(kill_at))  # inherited by the job
  try:
    return run_processes(TRAIN, tmp_path, n=2, devices=4)
  finally:
    del os.environ['RUN'], os.environ['KILL_AT']


def test_training_on_two_processes_survives_a_killed_process_and_equals_one_process(tmp_path):
  # The same global batches in the same order; process 0 alone writes the run's shared files.
  import jax
  from jax.flatten_util import ravel_pytree

  from tsuzuku_jax import data, models, train_lib

  for p in _train(tmp_path, 'whole'):
    assert p.returncode == 0, p.stderr[-3000:]
  whole = np.load(tmp_path / 'whole' / 'params0.npy')
  np.testing.assert_array_equal(whole, np.load(tmp_path / 'whole' / 'params1.npy'))
  # Process 1 killed at step 20: process 0 stops within its 5 s heartbeat timeout with one line
  # (its collectives would otherwise wait for ever), past the checkpoint of step 10.
  t0 = time.time()
  killed, survivor = _train(tmp_path, 'run', kill_at=20)[::-1]
  assert killed.returncode == -9 and survivor.returncode == distributed.LOST
  assert time.time() - t0 < 60
  # Its collective fails at once (gloo sees the connection reset or closed) or waits: the
  # watchdog's line.
  errors = [line for line in survivor.stderr.splitlines() if 'error' in line.lower()]
  assert len(errors) == 1 and re.fullmatch(
    r'error: process 0: (a collective with another process failed \(.*Gloo.*\)'
    r'|process 1 of 2 sent no heartbeat for 5 s \(it stopped or was killed\)); stopping this '
    r'job\. Restart every process with the same command to resume from the last checkpoint',
    errors[0],
  ), survivor.stderr[-3000:]
  run = tmp_path / 'run'
  assert '10' in os.listdir(run / 'checkpoints')
  # The same command again resumes from step 10 and ends with the uninterrupted parameters.
  procs = _train(tmp_path, 'run')
  for p in procs:
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {'step': 30}
  assert 'resumed from' in procs[0].stdout and 'step 20/30' in procs[0].stdout
  assert procs[1].stdout.count('step ') == 0  # process 0 alone prints
  np.testing.assert_array_equal(np.load(run / 'params0.npy'), whole)
  steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [10, 20, 30]
  assert len(list((run / 'tensorboard').iterdir())) == 2  # one event file per invocation
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['20', '30']
  # One process on this process's 8 devices: equal to float32 rounding (another summation
  # order across the processes).
  x, y = data.load('digits', 'train')
  config = train_lib.TrainConfig(steps=30, batch_size=128, log_every=10, checkpoint_every=10)
  state = train_lib.train(
    models.MLP(10, (32,)), config, x, y, str(tmp_path / 'one'), mesh=data.data_mesh(),
    log=lambda line: None,
  )  # fmt: skip
  assert jax.device_count() == 8
  one = np.asarray(ravel_pytree(jax.device_get(state.params))[0])
  np.testing.assert_allclose(whole, one, rtol=0, atol=1e-6)
